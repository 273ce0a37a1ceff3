"""Report figures derived from grouped ledger totals: the KPIs and latency percentiles."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from llmo.cost.money import MICROS_PER_UNIT, round_half_up_div


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already-sorted values (0.0 for no values)."""
    if not sorted_values:
        return 0.0
    if not 0 < p <= 100:
        raise ValueError("p must be within (0, 100]")
    rank = math.ceil(p / 100 * len(sorted_values))
    return float(sorted_values[max(rank, 1) - 1])


@dataclass(frozen=True)
class Kpis:
    tokens_per_dollar: float
    cost_per_request_micros: int
    cost_per_1k_requests_micros: int


def kpis(requests: int, total_tokens: int, cost_micros: int) -> Kpis:
    """Tokens per dollar (0 when nothing was spent) and cost per request / per 1k requests."""
    tokens_per_dollar = total_tokens * MICROS_PER_UNIT / cost_micros if cost_micros > 0 else 0.0
    if requests <= 0:
        return Kpis(tokens_per_dollar, 0, 0)
    return Kpis(
        tokens_per_dollar=tokens_per_dollar,
        cost_per_request_micros=round_half_up_div(cost_micros, requests),
        cost_per_1k_requests_micros=round_half_up_div(cost_micros * 1000, requests),
    )
