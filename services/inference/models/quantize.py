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

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", qweight)
        self.register_buffer("scales", scales.float())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        qweight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(qweight, scales, None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int8_linear(x, self.weight, self.scales, self.bias)


class Int4Linear(nn.Module):
    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.group_size = group_size
        self.out_features = packed.shape[0]
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        packed, scales, zeros = ops.quantize_int4(linear.weight.detach(), group_size)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(packed, scales.to(linear.weight.dtype), zeros, group_size, bias)

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
                    setattr(parent, name, Int8Linear.from_linear(linear))
                else:
                    group = _int4_group_size(linear.in_features)
                    if group is None:
                        raise ValueError(f"int4 needs in_features divisible by 64, {name} has {linear.in_features}")
                    setattr(parent, name, Int4Linear.from_linear(linear, group))
                count += 1
    return count


def attach_quantized_modules(model: LlamaForCausalLM, state: dict[str, torch.Tensor],
                             qconfig: dict[str, object], expected: dict[str, torch.Size]) -> str:
    """Install the projections of an `llmo-quant-v1` checkpoint (written by `python -m llmo.quant`).

    Pops their tensors from `state` and their fp weights from `expected`; returns "int8" or "int4".
    Raises ValueError naming the module or tensor that does not fit.
    """
    if qconfig.get("format") != "llmo-quant-v1":
        raise ValueError(f"unsupported llmo quantization format {qconfig.get('format')!r}; expected llmo-quant-v1")
    bits = qconfig.get("bits")
    if bits not in (4, 8):
        raise ValueError(f"quantization_config.bits must be 4 or 8, got {bits!r}")
    group = int(str(qconfig.get("group_size") or 0))
    modules = qconfig.get("modules")
    if not isinstance(modules, list) or not modules:
        raise ValueError("quantization_config.modules must list the quantized projections")
    for prefix in modules:
        shape = expected.pop(f"{prefix}.weight", None)
        if shape is None:
            raise ValueError(f"quantized module {prefix} is not a projection of this architecture")
        n, k = shape
        bias = state.pop(f"{prefix}.bias", None)
        expected.pop(f"{prefix}.bias", None)
        try:
            if bits == 8:
                qweight, scales = state.pop(f"{prefix}.qweight"), state.pop(f"{prefix}.weight_scale")
                if qweight.dtype != torch.int8 or tuple(qweight.shape) != (n, k) or tuple(scales.shape) != (n,):
                    raise ValueError(f"{prefix}: int8 qweight must be int8 [{n}, {k}] with weight_scale [{n}]")
                module: nn.Module = Int8Linear(qweight, scales.float(), bias)
            else:
                packed, scales, zeros = (state.pop(f"{prefix}.{t}") for t in ("qweight", "scales", "qzeros"))
                if packed.dtype != torch.uint8 or tuple(packed.shape) != (n, k // 2) or not group or k % group:
                    raise ValueError(f"{prefix}: int4 qweight must be uint8 [{n}, {k // 2}] with group size "
                                     f"dividing {k}")
                if tuple(scales.shape) != (n, k // group) or tuple(zeros.shape) != (n, k // group):
                    raise ValueError(f"{prefix}: int4 scales/qzeros must be [{n}, {k // group}]")
                module = Int4Linear(packed, scales, zeros, group, bias)
        except KeyError as exc:
            raise ValueError(f"quantized checkpoint is missing tensor {exc.args[0]}") from exc
        parent_name, attr = prefix.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attr, module)
    return "int8" if bits == 8 else "int4"
