"""Quantize a Hugging Face Llama-family checkpoint into the llmo-quant-v1 format.

    python -m llmo.quant --model DIR --out DIR --method awq-int4 [--group-size 128]

Methods: ``awq-int4`` (activation-aware scale search, folded into the
preceding norm / producer), ``rtn-int4`` (round to nearest), ``smoothquant-int8``
(SmoothQuant W8A8). Calibration tokens come from ``--calib-text`` (tokenized with
the checkpoint's tokenizer.json) or, failing that, seeded random token ids.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llmo.core.logging import get_logger
from llmo.ops.int4_layout import CHUNK, GROUP_SIZES, quantize_int4
from llmo.quant.awq import awq_search
from llmo.quant.format import FORMAT
from llmo.quant.llama import (
    PROJECTIONS,
    CheckpointError,
    LlamaShape,
    decoder_layer,
    dense_linear,
    embed,
    load_checkpoint,
)
from llmo.quant.smoothquant import quantize_int8_per_channel, smooth_scales

log = get_logger("llmo.quant")
METHODS = ("awq-int4", "rtn-int4", "smoothquant-int8")
# Calibration rows used by the AWQ grid search per layer group (bounds its cost).
AWQ_ROWS = 512


def _calibration_ids(
    model_dir: Path, shape: LlamaShape, text_file: Path | None, samples: int, seq_len: int, seed: int
) -> torch.Tensor:
    if text_file is not None:
        if not (model_dir / "tokenizer.json").is_file():
            raise CheckpointError(f"--calib-text needs {model_dir}/tokenizer.json")
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text_file.read_text()).ids
        if len(ids) < seq_len:
            raise ValueError(f"calibration text gives {len(ids)} tokens; need at least --seq-len={seq_len}")
        rows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:samples]
        return torch.tensor(rows, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, shape.vocab, (samples, seq_len), generator=gen)


def _fold(t: dict[str, torch.Tensor], producer: str, consumers: list[str], s: torch.Tensor, rows: bool) -> None:
    """Divide the producer by ``s`` (norm weight, or output rows of a linear) and
    multiply the consumers' input columns by ``s``: the network computes the same."""
    if rows:
        t[producer] = (t[producer].float() / s[:, None]).to(t[producer].dtype)
    else:
        t[producer] = (t[producer].float() / s).to(t[producer].dtype)
    for c in consumers:
        t[c] = (t[c].float() * s[None, :]).to(t[c].dtype)


def _groups(i: int, shape: LlamaShape) -> list[tuple[str, str, list[str], bool]]:
    """(recorded input, producer tensor, consumer weights, producer is a linear) per layer."""
    p = f"model.layers.{i}"
    groups = [
        (f"{p}.qkv", f"{p}.input_layernorm.weight",
         [f"{p}.self_attn.{n}_proj.weight" for n in ("q", "k", "v")], False),
        (f"{p}.gate_up", f"{p}.post_attention_layernorm.weight",
         [f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"], False),
        (f"{p}.down", f"{p}.mlp.up_proj.weight", [f"{p}.mlp.down_proj.weight"], True),
    ]
    # o_proj's input channels map one-to-one onto v_proj outputs only without GQA.
    if shape.heads == shape.kv_heads:
        groups.append((f"{p}.o", f"{p}.self_attn.v_proj.weight", [f"{p}.self_attn.o_proj.weight"], True))
    return groups


def _calibrate(
    t: dict[str, torch.Tensor], shape: LlamaShape, ids: torch.Tensor, choose: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]
) -> None:
    """Layer by layer: record each projection group's input, pick and fold scales,
    then run the (equivalent) layer to produce the next layer's input."""
    h = embed(ids, t)
    for i in range(shape.layers):
        inputs: dict[str, torch.Tensor] = {}

        def record(name: str, x: torch.Tensor, inputs: dict[str, torch.Tensor] = inputs) -> None:
            inputs[name] = x.reshape(-1, x.shape[-1]).detach()

        with torch.no_grad():
            decoder_layer(h, i, t, shape, dense_linear(t), record)
            for key, producer, consumers, rows in _groups(i, shape):
                s = choose(inputs[key], [t[c] for c in consumers])
                _fold(t, producer, consumers, s, rows)
            h = decoder_layer(h, i, t, shape, dense_linear(t))
        log.info("calibrated_layer", layer=i)


def quantize_checkpoint(
    model_dir: Path,
    out_dir: Path,
    method: str,
    group_size: int = 128,
    alpha: float = 0.5,
    calib_text: Path | None = None,
    samples: int = 8,
    seq_len: int = 128,
    seed: int = 0,
) -> dict[str, Any]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method.endswith("int4") and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}")
    cfg, tensors = load_checkpoint(model_dir)
    shape = LlamaShape.from_config(cfg)
    t = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    if method.endswith("int4"):
        for k in (shape.hidden, shape.intermediate, shape.heads * shape.head_dim):
            if k % CHUNK or k % group_size:
                raise ValueError(f"input width {k} is not a multiple of {CHUNK} and group_size={group_size}")
    if method != "rtn-int4":
        ids = _calibration_ids(model_dir, shape, calib_text, samples, seq_len, seed)
        if method == "awq-int4":
            def choose(x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
                rows = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:AWQ_ROWS]]
                return awq_search(rows, ws, group_size)[0]
        else:
            def choose(x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
                return smooth_scales(x.abs().amax(dim=0), ws, alpha)
        _calibrate(t, shape, ids, choose)

    out: dict[str, torch.Tensor] = {}
    quantized = []
    for name, value in t.items():
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix.split("model.layers.")[-1].split(".", 1)[-1] in PROJECTIONS:
            if method.endswith("int4"):
                packed, scales, zeros = quantize_int4(value, group_size)
                out.update({f"{prefix}.qweight": packed, f"{prefix}.scales": scales, f"{prefix}.qzeros": zeros})
            else:
                q, scale = quantize_int8_per_channel(value)
                out.update({f"{prefix}.qweight": q, f"{prefix}.weight_scale": scale})
            quantized.append(prefix)
        else:
            out[name] = value.to(tensors[name].dtype)
    if not quantized:
        raise CheckpointError("no Llama projection weights found to quantize")

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, out_dir / f.name)
    qcfg: dict[str, Any] = {
        "quant_method": "llmo",
        "format": FORMAT,
        "method": method,
        "bits": 4 if method.endswith("int4") else 8,
        "group_size": group_size if method.endswith("int4") else 0,
        "int4_layout": "llmo-int4-v1",
        "modules": sorted(quantized),
    }
    if method == "smoothquant-int8":
        qcfg["alpha"] = alpha
    (out_dir / "config.json").write_text(json.dumps({**cfg, "quantization_config": qcfg}, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in out.items()}, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    report = {"method": method, "modules": len(quantized), "out": str(out_dir),
              "bytes": (out_dir / "model.safetensors").stat().st_size}
    log.info("quantized_checkpoint", **report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmo.quant", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face Llama-family checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--method", choices=METHODS, default="awq-int4")
    parser.add_argument("--group-size", type=int, default=128, choices=GROUP_SIZES)
    parser.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    parser.add_argument("--calib-text", type=Path, default=None, help="text file for calibration (needs tokenizer.json)")
    parser.add_argument("--samples", type=int, default=8, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=128, help="calibration sequence length")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        report = quantize_checkpoint(args.model, args.out, args.method, args.group_size, args.alpha,
                                     args.calib_text, args.samples, args.seq_len, args.seed)
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0
