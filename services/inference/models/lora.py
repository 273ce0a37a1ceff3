"""LoRA adapters served next to their base model (S-LoRA / Punica style).

Every projection the engine can adapt is wrapped once in a :class:`LoraLinear` holding a
stack of adapter slots (``lora_a [slots, rank, in]``, ``lora_b [slots, out, rank]``,
zero-padded up to the configured rank). An engine step sets the slot of every token
row (``-1``: the base model) and one ``llmo.ops.batched_lora`` call per projection adds
each row's own adapter delta, so requests for different adapters and the base share one
forward pass.

Adapters are read from PEFT's saved format (``adapter_config.json`` +
``adapter_model.safetensors``). What the engine cannot serve is refused with an
:class:`AdapterError` naming it: DoRA, trained biases, ``modules_to_save`` (a retrained
``lm_head`` or embedding), targets outside the seven projections, shapes that do not fit
the base, ranks above the slots' rank.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from llmo import ops
from llmo.inference.models.config import ModelConfig

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# adapter_config.json is a few hundred bytes; anything far larger is not one.
MAX_CONFIG_BYTES = 1 << 20

_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)


class AdapterError(ValueError):
    """An adapter that cannot be served; `reason` is the API's ErrorInfo reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each adaptable projection."""
    q_out = config.num_heads * config.head_dim
    kv_out = config.num_kv_heads * config.head_dim
    hidden, inter = config.hidden_size, config.intermediate_size
    return {
        "q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out), "o_proj": (q_out, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }


@dataclass
class LoraAdapter:
    """One adapter's weights: (layer, projection) -> (A [r, in], B [out, r])."""

    rank: int
    alpha: float
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def target_modules(self) -> list[str]:
        return sorted({module for _, module in self.weights})

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def _read_config(path: Path) -> dict[str, object]:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise AdapterError("ADAPTER_INVALID", f"{path} has no {CONFIG_FILE} (not a PEFT adapter directory)")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError("ADAPTER_INVALID", f"{file} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError("ADAPTER_INVALID", f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterError("ADAPTER_INVALID", f"{file} must hold a JSON object")
    return config


def _check_config(config: dict[str, object], max_rank: int) -> tuple[int, float, float]:
    """(rank, alpha, scaling) of a LoRA config the engine can serve."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError("ADAPTER_UNSUPPORTED", f"peft_type {peft_type!r} is not served; only LORA adapters are")
    if config.get("use_dora"):
        raise AdapterError("ADAPTER_UNSUPPORTED", "DoRA adapters (use_dora) are not served")
    if config.get("bias", "none") != "none":
        raise AdapterError("ADAPTER_UNSUPPORTED", f"adapters with trained biases (bias={config.get('bias')!r}) are not served")
    if config.get("modules_to_save"):
        raise AdapterError("ADAPTER_UNSUPPORTED",
                           f"modules_to_save {config.get('modules_to_save')!r} (fully retrained modules) are not served")
    if config.get("fan_in_fan_out"):
        raise AdapterError("ADAPTER_UNSUPPORTED", "fan_in_fan_out adapters (Conv1D bases) do not fit a Llama model")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError("ADAPTER_UNSUPPORTED", "per-module ranks or alphas (rank_pattern, alpha_pattern) are not served")
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError("ADAPTER_INVALID", f"r must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise AdapterError("ADAPTER_INVALID", f"lora_alpha must be a finite number, got {alpha!r}")
    if rank > max_rank:
        raise AdapterError("ADAPTER_INCOMPATIBLE",
                           f"adapter rank {rank} exceeds this server's adapter rank limit {max_rank} "
                           "(LLMO_INFERENCE_MAX_ADAPTER_RANK)")
    scaling = float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return rank, float(alpha), scaling


def read_adapter(path: str | Path, config: ModelConfig, *, max_rank: int) -> LoraAdapter:
    """Read and check a PEFT LoRA adapter directory against the base model `config`."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError("ADAPTER_INVALID", f"adapter path {path} is not a directory")
    rank, alpha, scaling = _check_config(_read_config(path), max_rank)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        extra = " (only safetensors are read, not pickled .bin files)" if (path / "adapter_model.bin").exists() else ""
        raise AdapterError("ADAPTER_INVALID", f"{path} has no {WEIGHTS_FILE}{extra}")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError("ADAPTER_INVALID", f"{weights_file} is not a readable safetensors file: {exc}") from exc
    shapes = projection_shapes(config)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError("ADAPTER_INCOMPATIBLE", f"tensor {key!r} adapts a module this engine cannot serve; "
                                                      f"adaptable projections: {', '.join(TARGETS)}")
        layer, module, half = int(match.group(1)), match.group(2), match.group(3)
        if module not in shapes or layer >= config.num_layers:
            raise AdapterError("ADAPTER_INCOMPATIBLE", f"tensor {key!r} does not fit the base model "
                                                      f"({config.num_layers} layers; projections {', '.join(TARGETS)})")
        halves.setdefault((layer, module), {})[half] = tensor
    if not halves:
        raise AdapterError("ADAPTER_INVALID", f"{weights_file} holds no LoRA weights")
    adapter = LoraAdapter(rank, alpha, scaling)
    for (layer, module), pair in sorted(halves.items()):
        name = f"layer {layer} {module}"
        if set(pair) != {"A", "B"}:
            raise AdapterError("ADAPTER_INVALID", f"{name} has lora_{''.join(pair)} but not both lora_A and lora_B")
        a, b = pair["A"], pair["B"]
        fan_in, fan_out = shapes[module]
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise AdapterError("ADAPTER_INCOMPATIBLE",
                               f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                               f"(expected ({rank}, {fan_in}) / ({fan_out}, {rank}) for r={rank})")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError("ADAPTER_INVALID", f"{name} holds NaN or infinite weights")
        adapter.weights[(layer, module)] = (a, b)
    return adapter


class LoraContext:
    """The slot of every token row of the running step (None: no adapter rows in it)."""

    def __init__(self) -> None:
        self.indices: torch.Tensor | None = None


class LoraLinear(nn.Module):
    """A base projection (dense or quantized) plus the adapter slots' deltas for the rows that ask for them."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: torch.Tensor

    def __init__(self, base: nn.Module, fan_in: int, fan_out: int, slots: int, rank: int, dtype: torch.dtype,
                 device: torch.device, context: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.register_buffer("lora_a", torch.zeros(slots, rank, fan_in, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(slots, fan_out, rank, dtype=dtype, device=device), persistent=False)
        self.register_buffer("scaling", torch.zeros(slots, dtype=torch.float32, device=device), persistent=False)
        self.loaded = [False] * slots  # which slots hold weights for this projection
        self.active = False  # any of them: a projection no loaded adapter adapts costs nothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        indices = self.context.indices
        if indices is None or not self.active or x.dim() != 2:
            return out
        return ops.batched_lora(x, self.lora_a, self.lora_b, indices, self.scaling, out.contiguous())

    def write(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        """Put an adapter's A and B in `slot` (None: the adapter leaves this projection alone)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.scaling[slot] = 0.0
        self.loaded[slot] = a is not None
        self.active = any(self.loaded)
        if a is None or b is None:
            return
        rank = a.shape[0]
        self.lora_a[slot, :rank].copy_(a)
        self.lora_b[slot, :, :rank].copy_(b)
        self.scaling[slot] = scaling


class AdapterSlots:
    """The adapter slots of one loaded model: wraps its projections once, then writes and clears slots."""

    def __init__(self, model: nn.Module, config: ModelConfig, slots: int, rank: int, dtype: torch.dtype) -> None:
        if slots < 1 or rank < 1:
            raise ValueError("adapter slots and rank must be >= 1")
        self.config = config
        self.slots = slots
        self.rank = rank
        self.context = LoraContext()
        device = next(model.parameters()).device
        self.modules: dict[tuple[int, str], LoraLinear] = {}
        for layer_idx, layer in enumerate(model.model.layers):  # type: ignore[union-attr, arg-type]
            for module, (fan_in, fan_out) in projection_shapes(config).items():
                parent = layer.self_attn if module in ATTENTION_TARGETS else layer.mlp
                wrapped = LoraLinear(getattr(parent, module), fan_in, fan_out, slots, rank, dtype, device, self.context)
                setattr(parent, module, wrapped)
                self.modules[(layer_idx, module)] = wrapped

    @staticmethod
    def bytes_needed(config: ModelConfig, slots: int, rank: int, dtype: torch.dtype) -> int:
        per_layer = sum(fan_in + fan_out for fan_in, fan_out in projection_shapes(config).values())
        return config.num_layers * per_layer * slots * rank * torch.empty(0, dtype=dtype).element_size()

    def write(self, slot: int, adapter: LoraAdapter) -> None:
        for key, module in self.modules.items():
            a, b = adapter.weights.get(key, (None, None))
            module.write(slot, a, b, adapter.scaling)

    def clear(self, slot: int) -> None:
        for module in self.modules.values():
            module.write(slot, None, None, 0.0)
