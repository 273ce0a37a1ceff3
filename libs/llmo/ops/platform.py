"""Which backends a device offers, in order of preference.

One object answers "which device / which kernels" so the rest of the code
never sprinkles ``torch.cuda.is_available()`` checks.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Platform:
    """Backends per device type, most preferred first. ``reference`` is always last."""

    cuda_available: bool
    triton_available: bool
    triton_interpret: bool

    def backends_for(self, device: torch.device) -> tuple[str, ...]:
        if device.type == "cuda":
            return ("cuda", "triton", "reference")
        if device.type == "cpu":
            return ("cpu", "reference")
        return ("reference",)


@functools.cache
def current_platform() -> Platform:
    return Platform(
        cuda_available=torch.cuda.is_available(),
        triton_available=importlib.util.find_spec("triton") is not None,
        triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
    )
