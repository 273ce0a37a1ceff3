"""Weight quantization of a loaded model: INT8 W8A8 (per-channel weights, per-token activations)
and INT4 weight-only group quantization, running on the llmo.ops kernels."""

from __future__ import annotations

import torch
from torch import nn

from llmo import ops
from llmo.inference.models.llama import LlamaForCausalLM

QUANTIZATIONS = ("none", "int8", "int4")
_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Int8Linear(nn.Module):
    weight: torch.Tensor
    scales: torch.Tensor
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.float())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int8_linear(x, self.weight, self.scales, self.bias)


class Int4Linear(nn.Module):
    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        super().__init__()
        packed, scales, zeros = ops.quantize_int4(linear.weight.detach(), group_size)
        self.group_size = group_size
        self.out_features = linear.out_features
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.register_buffer("zeros", zeros)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        out = ops.int4_gemm(x.reshape(-1, x.shape[-1]), self.packed, self.scales, self.zeros, self.group_size,
                            self.bias)
        return out.reshape(*lead, self.out_features)


def _int4_group_size(in_features: int) -> int | None:
    for g in (64, 128, 32):
        if in_features % g == 0 and in_features % 64 == 0:
            return g
    return None


def quantize_model(model: LlamaForCausalLM, method: str) -> int:
    """Replace the decoder's projections in place; returns how many were quantized.

    Embeddings, norms and the LM head stay in the model dtype (as AWQ and SmoothQuant do).
    """
    if method not in QUANTIZATIONS:
        raise ValueError(f"unsupported quantization {method!r}; supported: {', '.join(QUANTIZATIONS)}")
    if method == "none":
        return 0
    count = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in _TARGETS:
                linear = getattr(parent, name, None)
                if not isinstance(linear, nn.Linear):
                    continue
                if method == "int8":
                    setattr(parent, name, Int8Linear(linear))
                else:
                    group = _int4_group_size(linear.in_features)
                    if group is None:
                        raise ValueError(f"int4 needs in_features divisible by 64, {name} has {linear.in_features}")
                    setattr(parent, name, Int4Linear(linear, group))
                count += 1
    return count
