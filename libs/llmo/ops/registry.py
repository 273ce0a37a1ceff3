"""The op registry: one reference implementation per op plus device overrides.

An override is registered for a backend name (``cpu``, ``cuda``, ``triton``)
with a ``supports`` predicate over the call's arguments (device, dtype, shape
limits). A call picks the first backend in the platform's preference list for
the tensors' device whose override is loadable and supports the arguments;
otherwise the reference runs. The choice is observable through
:func:`selected_backend` and is logged the first time it is made.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from llmo.core.logging import get_logger
from llmo.core.settings import OpsSettings
from llmo.ops.platform import current_platform

log = get_logger("llmo.ops")

REFERENCE = "reference"
Impl = Callable[..., Any]
Predicate = Callable[..., bool]


@dataclass
class Override:
    impl: Impl
    available: Callable[[], bool]
    supports: Predicate


@dataclass
class Op:
    name: str
    reference: Impl
    overrides: dict[str, Override] = field(default_factory=dict)

    def backends(self) -> list[str]:
        return [*self.overrides, REFERENCE]

    def impl(self, backend: str) -> Impl:
        if backend == REFERENCE:
            return self.reference
        if backend not in self.overrides:
            raise ValueError(f"op {self.name!r} has no backend {backend!r}; known: {self.backends()}")
        override = self.overrides[backend]
        if not override.available():
            raise RuntimeError(f"backend {backend!r} of op {self.name!r} is not available here")
        return override.impl

    def select(self, *args: Any, **kwargs: Any) -> str:
        forced = _forced.get(self.name) or _forced.get("*") or _ENV_BACKEND
        if forced is not None:
            return forced
        device = _first_device(args, kwargs)
        for backend in current_platform().backends_for(device):
            if backend == REFERENCE:
                return REFERENCE
            override = self.overrides.get(backend)
            if override is not None and override.available() and override.supports(*args, **kwargs):
                return backend
        return REFERENCE

    def dispatch(self, *args: Any, **kwargs: Any) -> tuple[str, Impl]:
        """The backend a call would use and its implementation."""
        backend = self.select(*args, **kwargs)
        if (self.name, backend) not in _announced:
            _announced.add((self.name, backend))
            log.info("op_backend_selected", op=self.name, backend=backend)
        return backend, self.impl(backend)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.dispatch(*args, **kwargs)[1](*args, **kwargs)


_ops: dict[str, Op] = {}
_forced: dict[str, str] = {}
# LLMO_OPS_BACKEND is read once, when llmo.ops is imported (dispatch is on the hot path).
_ENV_BACKEND = OpsSettings().backend or None
# Dispatch is on the hot path: each (op, backend) choice is logged once, not per call.
_announced: set[tuple[str, str]] = set()


def define(name: str, reference: Impl) -> Op:
    if name in _ops:
        raise ValueError(f"op {name!r} is already defined")
    op = Op(name, reference)
    _ops[name] = op
    return op


def register(
    name: str,
    backend: str,
    impl: Impl,
    available: Callable[[], bool],
    supports: Predicate | None = None,
) -> None:
    if backend == REFERENCE:
        raise ValueError("the reference backend is given by define()")
    _ops[name].overrides[backend] = Override(impl, available, supports or (lambda *a, **k: True))


def get_op(name: str) -> Op:
    if name not in _ops:
        raise ValueError(f"unknown op {name!r}; known: {sorted(_ops)}")
    return _ops[name]


def op_names() -> list[str]:
    return sorted(_ops)


@contextlib.contextmanager
def force_backend(backend: str, op: str = "*") -> Iterator[None]:
    """Run every op (or one op) on ``backend`` inside the block (tests, benchmarks)."""
    previous = _forced.get(op)
    _forced[op] = backend
    try:
        yield
    finally:
        if previous is None:
            _forced.pop(op, None)
        else:
            _forced[op] = previous


_CPU = torch.device("cpu")


def _first_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device:
    for value in args:
        if isinstance(value, torch.Tensor):
            return _CPU if value.is_cpu else value.device
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return _CPU if value.is_cpu else value.device
    return _CPU
