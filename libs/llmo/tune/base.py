"""The base model of a tuning run: a Hugging Face Llama checkpoint directory
(config.json + safetensors + tokenizer.json), checked up front so a wrong path fails with
a plain message rather than deep inside transformers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM

LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class CheckpointError(ValueError):
    """A directory that is not a usable Llama checkpoint, or a device that is not there."""


def read_config(path: Path | str) -> dict[str, Any]:
    """config.json of a Llama checkpoint directory; raises CheckpointError naming what is wrong."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory (expected a Hugging Face Llama checkpoint)")
    config_file = root / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{root} is not a Hugging Face checkpoint: it has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object")
    architectures = config.get("architectures") or []
    if config.get("model_type") != "llama" and not set(architectures) & set(LLAMA_ARCHITECTURES):
        found = architectures or config.get("model_type")
        raise CheckpointError(f"{root} is not a Llama checkpoint (architectures/model_type: {found!r})")
    if not sorted(root.glob("*.safetensors")):
        raise CheckpointError(f"{root} has no *.safetensors weights")
    if not (root / "tokenizer.json").is_file():
        raise CheckpointError(f"{root} has no tokenizer.json")
    return config


@dataclass(frozen=True)
class TokenizerInfo:
    tokenizer: Tokenizer
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids))


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<|endoftext|>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: Path | str, config: dict[str, Any] | None = None) -> TokenizerInfo:
    """tokenizer.json plus the end-of-text and padding ids (tokenizer_config.json, then config.json)."""
    root = Path(path)
    config = config if config is not None else read_config(root)
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    extra: dict[str, Any] = {}
    if (root / "tokenizer_config.json").is_file():
        extra = json.loads((root / "tokenizer_config.json").read_text())

    def token_id(key: str) -> int | None:
        name = _token_name(extra.get(key))
        return tokenizer.token_to_id(name) if name is not None else None

    eos = token_id("eos_token")
    if eos is None:
        raw = config.get("eos_token_id")
        eos = raw[0] if isinstance(raw, list) and raw else raw if isinstance(raw, int) else None
    if eos is None:
        raise CheckpointError(f"{root}: cannot tell the end-of-text token (no eos_token / eos_token_id)")
    pad = token_id("pad_token")
    return TokenizerInfo(tokenizer, int(eos), int(pad if pad is not None else eos))


def resolve_device(name: str) -> torch.device:
    """"cpu", "cuda", "cuda:N" or "auto" (cuda when present)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {name!r} requested but CUDA is not available here")
    if name != "cpu" and not name.startswith("cuda"):
        raise CheckpointError(f"unsupported device {name!r}; use cpu, cuda or auto")
    return torch.device(name)


def load_llama(path: Path | str, device: torch.device | str = "cpu") -> LlamaForCausalLM:
    """The checkpoint as an fp32 transformers LlamaForCausalLM (training keeps master weights in fp32)."""
    from transformers.utils import logging as hf_logging

    read_config(path)
    hf_logging.disable_progress_bar()
    try:
        model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load {path} as a Llama checkpoint: {exc}") from exc
    # transformers types `.to` through a decorator mypy cannot see through.
    return model.to(device)  # type: ignore[arg-type]


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (what a quantized base saves), with
    the per-block scales bitsandbytes keeps beside its 4-bit weights."""
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        absmax = getattr(getattr(p, "quant_state", None), "absmax", None)
        if isinstance(absmax, torch.Tensor):
            tensors.append(absmax)
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def make_readable(directory: Path) -> None:
    """Give the files a save wrote with owner-only permissions (safetensors via a temp file) the
    usual umask-based mode, like the rest of the checkpoint."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        if path.is_file() and path.stat().st_mode & 0o777 == 0o600:
            path.chmod(0o666 & ~umask)
