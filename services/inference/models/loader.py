"""Loads a local Hugging Face checkpoint directory into the engine's model class."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from llmo.inference.models.config import ModelConfig, ModelLoadError, rope_inv_freq
from llmo.inference.models.llama import LlamaForCausalLM
from llmo.inference.tokenizer import TextTokenizer

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    name: str
    path: Path
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: TextTokenizer
    dtype: torch.dtype
    quantization: str = "none"

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings


def resolve_dtype(name: str | None, config: ModelConfig) -> torch.dtype:
    key = (name or config.torch_dtype or "float32").replace("torch.", "")
    if key not in DTYPES:
        raise ModelLoadError(f"unsupported dtype {key!r}; supported: float32, bfloat16, float16")
    return DTYPES[key]


def _safetensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"missing weight shards in {path}: {', '.join(missing)}")
    return files


def read_state_dict(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in _safetensor_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device | str = "cpu") -> tuple[LlamaForCausalLM, str]:
    """The model with `state` loaded, and its weight quantization ("none", "int8", "int4")."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    quantization = "none"
    if config.quantization.get("quant_method") == "llmo":
        from llmo.inference.models.quantize import attach_quantized_modules

        try:
            quantization = attach_quantized_modules(model, state, config.quantization, expected)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
    elif config.quantization:
        raise ModelLoadError(f"unsupported quantization_config {config.quantization.get('quant_method')!r}; "
                             "supported: llmo (python -m llmo.quant)")
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    if unexpected:
        raise ModelLoadError(f"checkpoint has {len(unexpected)} unexpected tensors, e.g. {', '.join(unexpected[:3])}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise ModelLoadError(
                f"tensor {key} has shape {tuple(state[key].shape)}, config.json implies {tuple(shape)}"
            )
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config.head_dim, config.rope).to(device)
    return model.to(device).eval().requires_grad_(False), quantization


def load_model(path: str | Path | None = None, *, dtype: str | None = None, name: str | None = None,
               device: torch.device | str = "cpu", quantization: str = "none") -> LoadedModel:
    """Load config.json + safetensors + tokenizer.json from `path` (the demo model by default)."""
    root = Path(path) if path else DEMO_MODEL_DIR
    if not root.is_dir():
        raise ModelLoadError(f"model directory {root} does not exist")
    if quantization not in ("none", "int8", "int4"):
        raise ModelLoadError(f"unsupported quantization {quantization!r}; supported: none, int8, int4")
    config = ModelConfig.from_file(root / "config.json")
    torch_dtype = resolve_dtype(dtype, config)
    tokenizer = TextTokenizer.from_dir(root)
    state = read_state_dict(root, torch_dtype)
    model, stored = build_model(config, state, torch_dtype, device)
    if stored != "none":
        if quantization != "none":
            raise ModelLoadError(f"the checkpoint is already quantized ({stored}); load it with quantization='none'")
        quantization = stored
    elif quantization != "none":
        from llmo.inference.models.quantize import quantize_model

        try:
            quantize_model(model, quantization)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
    return LoadedModel(name=name or root.name, path=root, config=config, model=model, tokenizer=tokenizer,
                       dtype=torch_dtype, quantization=quantization)
