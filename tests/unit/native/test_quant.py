"""SmoothQuant, AWQ search and the checkpoint quantization tool (python -m llmo.quant)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmo.ops as ops
from llmo.quant import awq_search, load_quantized, quantize_int8_per_channel, smooth_scales
from llmo.quant.llama import LlamaShape, dense_linear, forward, load_checkpoint
from llmo.quant.tool import _calibrate, main, quantize_checkpoint


def outlier_activations(n: int, k: int, channels: list[int], factor: float) -> torch.Tensor:
    x = torch.randn(n, k)
    x[:, channels] *= factor
    return x


def w8a8(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    q, s = quantize_int8_per_channel(w)
    return ops.int8_linear(x, q, s)


def test_smoothquant_is_exact_in_float_and_tames_outliers() -> None:
    x = outlier_activations(64, 256, [3, 77, 200], 60.0)
    w = torch.randn(96, 256) * 0.05
    s = smooth_scales(x.abs().amax(dim=0), [w], alpha=0.5)
    torch.testing.assert_close((x / s) @ (w * s).t(), x @ w.t(), rtol=1e-4, atol=1e-4)
    want = x @ w.t()
    plain = float((w8a8(x, w) - want).pow(2).mean())
    smoothed = float((w8a8(x / s, w * s) - want).pow(2).mean())
    assert smoothed < 0.5 * plain


def test_smooth_scales_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(torch.ones(4), [torch.ones(2, 4)], alpha=1.5)
    with pytest.raises(ValueError, match="weights must be"):
        smooth_scales(torch.ones(4), [torch.ones(2, 5)])


def test_int8_per_channel_round_trip() -> None:
    w = torch.randn(32, 64)
    q, s = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert float((q.float() * s[:, None] - w).abs().max()) <= float(s.max()) * 0.5 + 1e-6


def test_awq_search_beats_round_to_nearest_on_salient_channels() -> None:
    x = outlier_activations(256, 256, list(range(0, 256, 16)), 20.0)
    w = torch.randn(128, 256) * 0.05
    s, best, rtn = awq_search(x, [w], group_size=64)
    assert s.shape == (256,) and bool((s > 0).all())
    assert best < 0.8 * rtn
    # The salient channels get the larger scales.
    assert float(s[::16].mean()) > float(s.mean())


def test_awq_search_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="K="):
        awq_search(torch.randn(4, 64), [torch.randn(8, 128)], 64)
    with pytest.raises(ValueError, match="non-empty"):
        awq_search(torch.randn(0, 64), [torch.randn(8, 64)], 64)


def tiny_llama(root: Path, heads: int = 4, kv_heads: int = 2) -> Path:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96, "hidden_size": 128,
        "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    }
    gen = torch.Generator().manual_seed(1)
    head_dim = 128 // heads
    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(96, 128, generator=gen),
        "model.norm.weight": torch.ones(128),
        "lm_head.weight": torch.randn(96, 128, generator=gen) * 0.1,
    }
    for i in range(2):
        p = f"model.layers.{i}"
        shapes = {"self_attn.q_proj": (heads * head_dim, 128), "self_attn.k_proj": (kv_heads * head_dim, 128),
                  "self_attn.v_proj": (kv_heads * head_dim, 128), "self_attn.o_proj": (128, heads * head_dim),
                  "mlp.gate_proj": (256, 128), "mlp.up_proj": (256, 128), "mlp.down_proj": (128, 256)}
        for name, shape in shapes.items():
            t[f"{p}.{name}.weight"] = torch.randn(*shape, generator=gen) * 0.08
        t[f"{p}.input_layernorm.weight"] = 1 + torch.rand(128, generator=gen)
        t[f"{p}.post_attention_layernorm.weight"] = 1 + torch.rand(128, generator=gen)
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(cfg))
    (root / "tokenizer_config.json").write_text("{}")
    save_file(t, str(root / "model.safetensors"))
    return root


IDS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("heads", [2, 4])
def test_scale_folding_keeps_the_network_function(tmp_path: Path, heads: int) -> None:
    model = tiny_llama(tmp_path / "m", heads=4, kv_heads=heads)
    cfg, t = load_checkpoint(model)
    shape = LlamaShape.from_config(cfg)
    want = forward(IDS, t, shape, dense_linear(t))
    folded = dict(t)
    _calibrate(folded, shape, IDS, lambda x, ws: torch.rand(x.shape[1]) * 3 + 0.2)
    assert not torch.equal(folded["model.layers.0.input_layernorm.weight"], t["model.layers.0.input_layernorm.weight"])
    torch.testing.assert_close(forward(IDS, folded, shape, dense_linear(folded)), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("method", "budget"), [("awq-int4", 0.35), ("rtn-int4", 0.35), ("smoothquant-int8", 0.06)])
# Budgets are mean relative logit errors of a random 2-layer network (which amplifies
# weight noise far more than a trained one); a wrong zero point, scale or packing
# order lands near 1.0.
def test_tool_writes_a_loadable_checkpoint_close_to_full_precision(tmp_path: Path, method: str, budget: float) -> None:
    model = tiny_llama(tmp_path / "m")
    out = tmp_path / "q"
    assert main(["--model", str(model), "--out", str(out), "--method", method, "--group-size", "64",
                 "--samples", "2", "--seq-len", "32"]) == 0
    ckpt = load_quantized(out)
    assert ckpt.quantization["method"] == method and ckpt.quantization["format"] == "llmo-quant-v1"
    assert (out / "tokenizer_config.json").is_file()
    assert len(ckpt.quantization["modules"]) == 14
    q = "model.layers.1.mlp.down_proj"
    assert f"{q}.weight" not in ckpt.tensors
    if method.endswith("int4"):
        assert ckpt.tensors[f"{q}.qweight"].dtype == torch.uint8 and ckpt.tensors[f"{q}.qweight"].shape == (128, 128)
        assert ckpt.tensors[f"{q}.scales"].shape == (128, 4) and ckpt.tensors[f"{q}.qzeros"].dtype == torch.uint8
    else:
        assert ckpt.tensors[f"{q}.qweight"].dtype == torch.int8 and ckpt.tensors[f"{q}.weight_scale"].shape == (128,)
    cfg, t = load_checkpoint(model)
    shape = LlamaShape.from_config(cfg)
    want = forward(IDS, t, shape, dense_linear(t))
    got = forward(IDS, ckpt.tensors, shape, ckpt.linear())
    rel = float((got - want).abs().mean() / want.abs().mean())
    assert rel < budget
    assert "model.embed_tokens.weight" in load_file(str(out / "model.safetensors"))


def test_tool_reports_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    model = tiny_llama(tmp_path / "m")
    with pytest.raises(ValueError, match="unknown method"):
        quantize_checkpoint(model, tmp_path / "o", "int3")
    with pytest.raises(ValueError, match="is not a quantized checkpoint"):
        load_quantized(tmp_path / "nothing")
    with pytest.raises(ValueError, match="llmo-quant-v1"):
        load_quantized(model.parent / "m")
