"""Sampling parameters the router forwards upstream, their bounds, and their cache identity.

Every parameter here changes the answer, so all of them are part of the response-cache
key (`cache_key`). Parameters the router cannot carry through its single-choice,
text-only pipeline (n > 1, tools, logprobs, ...) are rejected at the edge instead of
being dropped silently.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from llmo.core.errors import invalid_argument
from llmo.core.limits import MAX_LABEL_LEN, preview

MAX_TOP_K = 1 << 20
MAX_STOP_SEQUENCES = 16
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class Sampling:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: tuple[str, ...] = ()

    def openai_fields(self) -> dict[str, Any]:
        """The set fields as OpenAI request body fields."""
        out: dict[str, Any] = {k: v for k, v in asdict(self).items() if v is not None and k != "stop"}
        if self.stop:
            out["stop"] = list(self.stop)
        return out

    def cache_key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def check(self) -> Sampling:
        """Raise INVALID_ARGUMENT naming the first parameter out of range; return self."""
        _number(self.temperature, "temperature", 0.0, 2.0)
        _number(self.top_p, "top_p", 0.0, 1.0, low_open=True)
        _number(self.presence_penalty, "presence_penalty", -2.0, 2.0)
        _number(self.frequency_penalty, "frequency_penalty", -2.0, 2.0)
        _number(self.top_k, "top_k", 0, MAX_TOP_K)
        _number(self.seed, "seed", INT64_MIN, INT64_MAX)
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise invalid_argument("INVALID_STOP", f"stop has {len(self.stop)} sequences; the limit is {MAX_STOP_SEQUENCES}",
                                   field="stop")
        for s in self.stop:
            if not s or len(s) > MAX_LABEL_LEN:
                raise invalid_argument("INVALID_STOP", f"each stop sequence must be 1..{MAX_LABEL_LEN} characters",
                                       field="stop")
        return self


def _number(value: float | None, name: str, low: float, high: float, *, low_open: bool = False) -> None:
    if value is None:
        return
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise invalid_argument(
            "INVALID_SAMPLING_PARAMS", f"{name} must be in {bracket}{low:g}, {high:g}], got {preview(value, 40)}", field=name
        )
