"""A compact pure-PyTorch Llama forward used for calibration and accuracy checks.

Linears are applied through a callable ``linear(prefix, x)`` so the same forward
runs full-precision weights, fake-quantized weights or the packed kernels.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

Linear = Callable[[str, torch.Tensor], torch.Tensor]
Recorder = Callable[[str, torch.Tensor], None]

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class CheckpointError(ValueError):
    """The model directory is missing files or holds an unsupported architecture."""


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    eps: float
    theta: float
    vocab: int
    tie_embeddings: bool

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> LlamaShape:
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            return cls(
                hidden=hidden,
                heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads", heads)),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                intermediate=int(cfg["intermediate_size"]),
                layers=int(cfg["num_hidden_layers"]),
                eps=float(cfg.get("rms_norm_eps", 1e-6)),
                theta=float(cfg.get("rope_theta", 10000.0)),
                vocab=int(cfg["vocab_size"]),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except KeyError as exc:
            raise CheckpointError(f"config.json lacks {exc.args[0]!r}") from exc


def load_checkpoint(model_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json plus every tensor of ``model.safetensors`` or a sharded index."""
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} has no config.json")
    cfg = json.loads((model_dir / "config.json").read_text())
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    if cfg.get("model_type", "llama") not in ("llama", "mistral", "qwen2") and "LlamaForCausalLM" not in archs:
        raise CheckpointError(f"unsupported architecture {archs} (Llama family only)")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir} has no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return cfg, tensors


def dense_linear(tensors: dict[str, torch.Tensor]) -> Linear:
    def apply(prefix: str, x: torch.Tensor) -> torch.Tensor:
        out = x @ tensors[f"{prefix}.weight"].float().t()
        bias = tensors.get(f"{prefix}.bias")
        return out if bias is None else out + bias.float()

    return apply


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """NeoX-style rotary on ``x[B, H, T, D]`` for positions 0..T-1."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(x.shape[2], dtype=torch.float32), inv)
    cos, sin = freqs.cos(), freqs.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def decoder_layer(
    h: torch.Tensor, i: int, t: dict[str, torch.Tensor], s: LlamaShape, linear: Linear, record: Recorder | None = None
) -> torch.Tensor:
    p = f"model.layers.{i}"
    b, n, _ = h.shape
    x = _rms(h, t[f"{p}.input_layernorm.weight"], s.eps)
    if record:
        record(f"{p}.qkv", x)
    q = linear(f"{p}.self_attn.q_proj", x).view(b, n, s.heads, s.head_dim).transpose(1, 2)
    k = linear(f"{p}.self_attn.k_proj", x).view(b, n, s.kv_heads, s.head_dim).transpose(1, 2)
    v = linear(f"{p}.self_attn.v_proj", x).view(b, n, s.kv_heads, s.head_dim).transpose(1, 2)
    q, k = _rope(q, s.theta), _rope(k, s.theta)
    group = s.heads // s.kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, s.heads * s.head_dim)
    if record:
        record(f"{p}.o", attn)
    h = h + linear(f"{p}.self_attn.o_proj", attn)
    x = _rms(h, t[f"{p}.post_attention_layernorm.weight"], s.eps)
    if record:
        record(f"{p}.gate_up", x)
    act = F.silu(linear(f"{p}.mlp.gate_proj", x)) * linear(f"{p}.mlp.up_proj", x)
    if record:
        record(f"{p}.down", act)
    return h + linear(f"{p}.mlp.down_proj", act)


def embed(ids: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    return t["model.embed_tokens.weight"].float()[ids]


def logits(h: torch.Tensor, t: dict[str, torch.Tensor], s: LlamaShape) -> torch.Tensor:
    head = t["model.embed_tokens.weight"] if s.tie_embeddings or "lm_head.weight" not in t else t["lm_head.weight"]
    return _rms(h, t["model.norm.weight"], s.eps) @ head.float().t()


def forward(ids: torch.Tensor, t: dict[str, torch.Tensor], s: LlamaShape, linear: Linear) -> torch.Tensor:
    h = embed(ids, t)
    for i in range(s.layers):
        h = decoder_layer(h, i, t, s, linear)
    return logits(h, t, s)
