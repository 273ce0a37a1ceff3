"""Circuit breakers and retry back-off for upstream providers."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    """Opens after `failure_threshold` consecutive provider failures; after `reset_s` lets
    one trial call through (half-open): success closes it, failure opens it again. Client
    errors (the upstream refusing a bad request) are neutral: they never open it."""

    failure_threshold: int = 5
    reset_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    opened_at: float | None = None
    _trial_in_flight: bool = False

    @property
    def state(self) -> BreakerState:
        if self.opened_at is None:
            return BreakerState.CLOSED
        if self.clock() - self.opened_at >= self.reset_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self) -> bool:
        state = self.state
        if state == BreakerState.CLOSED:
            return True
        if state == BreakerState.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self._trial_in_flight = False

    def record_neutral(self) -> None:
        """The call says nothing about the provider's health (it refused the caller's
        request): counts stay as they are; a half-open trial slot is given back."""
        self._trial_in_flight = False

    def record_failure(self) -> None:
        self.failures += 1
        self._trial_in_flight = False
        if self.opened_at is not None or self.failures >= self.failure_threshold:
            self.opened_at = self.clock()


def backoff_delay(attempt: int, base_s: float = 0.05, cap_s: float = 2.0, rng: random.Random | None = None) -> float:
    """Full-jitter exponential back-off: uniform in [0, min(cap, base * 2**attempt)]."""
    r = rng or random
    return r.uniform(0.0, min(cap_s, base_s * (2**attempt)))


class BreakerBoard:
    """One breaker per provider name, created on first use with that provider's limits."""

    def __init__(self) -> None:
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, name: str, failure_threshold: int, reset_s: float) -> CircuitBreaker:
        breaker = self._breakers.get(name)
        if breaker is None or breaker.failure_threshold != failure_threshold or breaker.reset_s != reset_s:
            breaker = CircuitBreaker(failure_threshold=failure_threshold, reset_s=reset_s)
            self._breakers[name] = breaker
        return breaker

    def states(self) -> dict[str, BreakerState]:
        return {k: b.state for k, b in self._breakers.items()}
