"""Spend forecast: a least-squares linear trend over daily spend with a prediction band."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, timedelta
from statistics import NormalDist


@dataclass(frozen=True)
class ForecastPoint:
    day: date
    expected_micros: int
    lower_micros: int
    upper_micros: int


@dataclass(frozen=True)
class ForecastResult:
    history_days: int
    slope_micros_per_day: float
    points: list[ForecastPoint]
    total_expected_micros: int
    total_lower_micros: int
    total_upper_micros: int


def fill_days(spend: dict[date, int], start: date, end: date) -> list[tuple[date, int]]:
    """Daily series over [start, end] with days without usage as zero spend."""
    days = (end - start).days + 1
    return [(start + timedelta(days=i), spend.get(start + timedelta(days=i), 0)) for i in range(max(days, 0))]


def forecast(history: list[tuple[date, int]], horizon_days: int, confidence: float = 0.95) -> ForecastResult:
    """Project ``horizon_days`` after the last history day.

    Model: spend_t = a + b*t fitted by ordinary least squares. The band is the
    normal-approximation prediction interval ``yhat ± z * s * sqrt(1 + 1/n + (t - tbar)^2 / Sxx)``
    with ``s`` the residual standard error; predictions and bounds are clamped at zero.
    """
    if horizon_days < 1:
        raise ValueError("horizon_days must be at least 1")
    if not 0 < confidence < 1:
        raise ValueError("confidence must be within (0, 1)")
    n = len(history)
    if n == 0:
        raise ValueError("no history to forecast from")
    ys = [float(v) for _, v in history]
    ts = [float(i) for i in range(n)]
    tbar = sum(ts) / n
    ybar = sum(ys) / n
    sxx = sum((t - tbar) ** 2 for t in ts)
    slope = sum((t - tbar) * (y - ybar) for t, y in zip(ts, ys, strict=True)) / sxx if sxx else 0.0
    intercept = ybar - slope * tbar
    sse = sum((y - (intercept + slope * t)) ** 2 for t, y in zip(ts, ys, strict=True))
    s = math.sqrt(sse / (n - 2)) if n > 2 else 0.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    last = history[-1][0]
    points = []
    for h in range(1, horizon_days + 1):
        t = float(n - 1 + h)
        yhat = intercept + slope * t
        spread = z * s * math.sqrt(1 + 1 / n + ((t - tbar) ** 2 / sxx if sxx else 0.0))
        points.append(
            ForecastPoint(
                day=last + timedelta(days=h),
                expected_micros=max(0, round(yhat)),
                lower_micros=max(0, round(yhat - spread)),
                upper_micros=max(0, round(yhat + spread)),
            )
        )
    return ForecastResult(
        history_days=n,
        slope_micros_per_day=slope,
        points=points,
        total_expected_micros=sum(p.expected_micros for p in points),
        total_lower_micros=sum(p.lower_micros for p in points),
        total_upper_micros=sum(p.upper_micros for p in points),
    )
