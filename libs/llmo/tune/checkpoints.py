"""Training checkpoints: adapter weights, optimizer, step and RNG state, written atomically under
``<output>/checkpoints/step-NNNNNNNN`` so an interrupted run resumes exactly where it stopped."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

STATE_FILE = "trainer_state.json"
PREFIX = "step-"


class ResumeError(ValueError):
    """No checkpoint to resume from, or one written by a run with different settings."""


@dataclass
class TrainState:
    step: int
    history: list[dict[str, Any]]
    train_seconds: float
    train_tokens: int
    fingerprint: dict[str, Any]
    step_seconds: list[float] = field(default_factory=list)  # each optimizer step's wall time

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "history": self.history, "train_seconds": self.train_seconds,
                "train_tokens": self.train_tokens, "fingerprint": self.fingerprint, "step_seconds": self.step_seconds}


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def save(root: Path, model: PeftModel, optimizer: torch.optim.Optimizer, state: TrainState, keep: int) -> Path:
    final = root / f"{PREFIX}{state.step:08d}"
    staging = root / f".{final.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    model.save_pretrained(str(staging))
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    torch.save(rng, staging / "rng.pt")
    (staging / STATE_FILE).write_text(json.dumps(state.to_json(), indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def load_latest(root: Path, model: PeftModel, optimizer: torch.optim.Optimizer,
                fingerprint: dict[str, Any]) -> tuple[TrainState, Path]:
    """Restore the newest checkpoint into ``model`` and ``optimizer`` and the RNGs; returns its state."""
    found = checkpoint_dirs(root)
    if not found:
        raise ResumeError(f"nothing to resume: no checkpoint under {root}")
    latest = found[-1]
    raw = json.loads((latest / STATE_FILE).read_text())
    differences = _differences(raw.get("fingerprint", {}), fingerprint)
    if differences:
        raise ResumeError(f"{latest} was written with other settings; " + "; ".join(differences))
    set_peft_model_state_dict(model, load_file(str(latest / "adapter_model.safetensors")))
    optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
    rng = torch.load(latest / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))
    state = TrainState(int(raw["step"]), list(raw["history"]), float(raw["train_seconds"]),
                       int(raw["train_tokens"]), dict(raw["fingerprint"]), [float(s) for s in raw["step_seconds"]])
    return state, latest
