"""Progress events the training loops report (the CLI draws them as a progress bar)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Event:
    kind: str  # "start", "step", "eval", "checkpoint"
    step: int
    total_steps: int
    epoch: int
    loss: float | None = None
    eval_perplexity: float | None = None
    tokens_per_s: float | None = None
    path: Path | None = None


Listener = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The listener of a run nobody watches."""
