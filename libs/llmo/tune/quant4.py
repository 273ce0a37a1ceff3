"""The frozen 4-bit base of QLoRA, in one of two formats.

* ``llmo-int4``: the project's own group-wise INT4 (``llmo-int4-v1`` packing, asymmetric,
  group 64) run by ``llmo.ops.int4_gemm``; :class:`Int4Linear` is a frozen module and
  :class:`Int4LoraLinear` the PEFT LoRA layer for it (registered through
  ``LoraConfig._register_custom_module``), so PEFT trains and saves adapters as usual.
* ``bnb-nf4``: bitsandbytes ``Linear4bit`` with NF4 (QLoRA's data type); PEFT has its LoRA layer.

Only the decoder projections are quantized; embeddings, norms and the LM head stay fp32
(as QLoRA and the inference engine's INT4 path do).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import llmo.ops as ops
from llmo.tune.base import CheckpointError, read_config

BACKENDS = ("llmo-int4", "bnb-nf4")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_GROUP_SIZE = 64


class _Int4MatMul(torch.autograd.Function):
    """``x @ W^T`` with a frozen packed INT4 ``W``: the gradient flows to ``x`` only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                qzeros: torch.Tensor, group_size: int) -> torch.Tensor:
        ctx.save_for_backward(qweight, scales, qzeros)
        ctx.group_size = group_size
        return ops.int4_gemm(x, qweight, scales, qzeros, group_size)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        qweight, scales, qzeros = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        # Dequantized on the fly and dropped: the fp weight never stays resident.
        weight = ops.dequantize_int4(qweight, scales, qzeros, ctx.group_size).to(grad.dtype)
        return grad @ weight, None, None, None, None


class Int4Linear(nn.Module):
    """A frozen linear layer stored as llmo-int4-v1 (``qweight``/``scales``/``qzeros`` buffers,
    the names of the project's quantized checkpoint format)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, half = qweight.shape
        self.in_features = 2 * half
        self.group_size = group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Linear:
        packed, scales, zeros = ops.quantize_int4(linear.weight.detach(), group_size)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(packed, scales, zeros, group_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = _Int4MatMul.apply(flat, self.qweight, self.scales, self.qzeros, self.group_size)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int4LoraLinear(nn.Module, LoraLayer):
    """PEFT LoRA on a frozen :class:`Int4Linear`: ``base(x) + B(A(dropout(x))) * scaling``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        if config.use_dora:
            raise ValueError("DoRA is not supported on the llmo-int4 base")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            dtype = next(lora_a.parameters()).dtype
            update = lora_b(lora_a(self.lora_dropout[name](x.to(dtype))))
            result = result + (update * self.scaling[name]).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError("merging into an INT4 base would requantize it; merge into the fp base instead")

    def unmerge(self) -> None:
        raise NotImplementedError("an INT4 base is never merged")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _bnb_linear(linear: nn.Linear, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().to("cpu").clone(), requires_grad=False,
                                     quant_type="nf4")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(device)  # moving a Params4bit to its device is what quantizes it


def quantize_linear(linear: nn.Linear, backend: str, group_size: int = DEFAULT_GROUP_SIZE,
                    device: torch.device | str = "cpu", name: str = "linear") -> nn.Module:
    """The frozen 4-bit module of one fp linear layer."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown 4-bit backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "bnb-nf4":
        return _bnb_linear(linear, torch.device(device))
    if linear.in_features % 64 or linear.in_features % group_size:
        raise ValueError(f"{name}: llmo-int4 needs in_features divisible by 64 and {group_size}, "
                         f"got {linear.in_features}")
    return Int4Linear.from_linear(linear, group_size).to(device)


def _targets(model: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(qualified name, parent, attribute, linear) of every projection to quantize."""
    found = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if attr in names and isinstance(child, nn.Linear):
                found.append((f"{parent_name}.{attr}" if parent_name else attr, parent, attr, child))
    return found


def quantize_projections(model: nn.Module, backend: str, group_size: int = DEFAULT_GROUP_SIZE,
                         names: tuple[str, ...] = PROJECTIONS) -> int:
    """Swap every decoder projection named in ``names`` of a loaded model for a frozen 4-bit
    module, in place; everything is frozen. Returns how many were swapped."""
    device = next(model.parameters()).device
    targets = _targets(model, names)
    for qualified, parent, attr, linear in targets:
        setattr(parent, attr, quantize_linear(linear, backend, group_size, device, qualified))
    for p in model.parameters():
        p.requires_grad_(False)
    return len(targets)


def load_llama_4bit(path: Path | str, backend: str, group_size: int = DEFAULT_GROUP_SIZE,
                    device: torch.device | str = "cpu", names: tuple[str, ...] = PROJECTIONS) -> LlamaForCausalLM:
    """The checkpoint with its projections quantized as they are read, one tensor at a time, so
    the fp32 weights of the whole model are never resident together (the point of a 4-bit base)."""
    root = Path(path)
    read_config(root)
    config = LlamaConfig.from_pretrained(str(root))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    where: dict[str, Path] = {}
    for file in sorted(root.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))

    def read(key: str) -> torch.Tensor:
        with safe_open(str(where[key]), framework="pt") as handle:
            tensor = handle.get_tensor(key)
        return tensor.float() if tensor.is_floating_point() else tensor

    used: set[str] = set()
    for qualified, parent, attr, meta in _targets(model, names):
        key = f"{qualified}.weight"
        if key not in where:
            raise CheckpointError(f"{root} lacks tensor {key}")
        weight = read(key)
        if tuple(weight.shape) != (meta.out_features, meta.in_features):
            raise CheckpointError(f"{key} has shape {tuple(weight.shape)}, config.json implies "
                                  f"{(meta.out_features, meta.in_features)}")
        linear = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if meta.bias is not None:
            linear.bias = nn.Parameter(read(f"{qualified}.bias"), requires_grad=False)
            used.add(f"{qualified}.bias")
        setattr(parent, attr, quantize_linear(linear, backend, group_size, "cpu", qualified))
        used.add(key)
        del weight, linear
    rest = {key: read(key) for key in where if key not in used}
    model.load_state_dict(rest, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # non-persistent buffers, never in the file
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise CheckpointError(f"{root} lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)  # type: ignore[arg-type]


def lora_config_for(backend: str | None, config: LoraConfig) -> LoraConfig:
    """The LoRA config, with the custom LoRA layer registered when the base is llmo-int4."""
    if backend == "llmo-int4":
        config._register_custom_module({Int4Linear: Int4LoraLinear})
    return config


@contextlib.contextmanager
def quiet_peft_warnings() -> Iterator[None]:
    """Silence two warnings that say nothing to a user here: PEFT's "Unsupported layer type" for
    every custom base it sizes (Int4Linear is ours), and transformers 5 deprecating the
    attribute PEFT still reads while wrapping a model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield
