"""Total cost of ownership: API spend versus self-hosting, break-even and payback.

All formulas are documented in services/cost/README.md. Arithmetic is exact
(``fractions.Fraction``); money results are rounded half-up to whole micros and
token volumes to whole tokens only when they leave this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction

MTOK = 1_000_000


class TcoInputError(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class TcoInput:
    tokens_per_day: Fraction
    input_fraction: Fraction
    api_input_per_mtok_micros: int
    api_output_per_mtok_micros: int
    throughput_tokens_per_s: Fraction
    gpu_count: int = 1
    gpu_type: str = ""
    gpu_hourly_micros: int = 0
    capex_per_gpu_micros: int = 0
    amortisation_months: int = 36
    hours_per_month: Fraction = Fraction(730)
    uptime_fraction: Fraction = Fraction(1)
    utilisation: Fraction = Fraction(1)
    ops_labour_micros_per_month: int = 0
    facility_overhead_fraction: Fraction = Fraction(0)
    monthly_growth: Fraction = Fraction(0)
    horizon_months: int = 36

    def validate(self) -> None:
        checks: list[tuple[bool, str, str]] = [
            (self.tokens_per_day >= 0, "tokens_per_day", "must not be negative"),
            (0 <= self.input_fraction <= 1, "input_fraction", "must be within [0, 1]"),
            (self.api_input_per_mtok_micros >= 0, "api_input_price", "must not be negative"),
            (self.api_output_per_mtok_micros >= 0, "api_output_price", "must not be negative"),
            (self.blended_per_mtok > 0, "api_price", "blended API price must be positive"),
            (self.throughput_tokens_per_s > 0, "throughput_tokens_per_s", "must be positive (measure it)"),
            (self.gpu_count >= 1, "gpu_count", "must be at least 1"),
            (self.gpu_hourly_micros >= 0, "gpu_hourly", "must not be negative"),
            (self.capex_per_gpu_micros >= 0, "capex", "must not be negative"),
            (self.gpu_hourly_micros > 0 or self.capex_per_gpu_micros > 0, "gpu_cost", "give a GPU $/hour or a capex"),
            (self.amortisation_months >= 1, "amortisation_months", "must be at least 1"),
            (self.hours_per_month > 0, "hours_per_month", "must be positive"),
            (0 < self.uptime_fraction <= 1, "uptime_fraction", "must be within (0, 1]"),
            (0 < self.utilisation <= 1, "utilisation", "must be within (0, 1]"),
            (self.ops_labour_micros_per_month >= 0, "ops_labour", "must not be negative"),
            (self.facility_overhead_fraction >= 0, "facility_overhead_fraction", "must not be negative"),
            (self.monthly_growth > -1, "monthly_growth", "must be above -100%"),
            (1 <= self.horizon_months <= 120, "horizon_months", "must be within [1, 120]"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise TcoInputError(name, message)

    @property
    def days_per_month(self) -> Fraction:
        return self.hours_per_month / 24

    @property
    def blended_per_mtok(self) -> Fraction:
        """API price per million tokens weighted by the input/output mix (micros)."""
        return self.input_fraction * self.api_input_per_mtok_micros + (1 - self.input_fraction) * self.api_output_per_mtok_micros


@dataclass(frozen=True)
class MonthCost:
    month: int
    tokens_per_day: int
    api_micros: int
    self_hosted_micros: int
    gpus: int


@dataclass(frozen=True)
class SensitivityRow:
    parameter: str
    multiplier: Fraction
    api_monthly_micros: int
    self_hosted_monthly_micros: int
    break_even_tokens_per_day: int
    cheaper: str


@dataclass(frozen=True)
class TcoResult:
    api_monthly_micros: int
    self_hosted_monthly_micros: int
    self_hosted_compute_micros: int
    self_hosted_overhead_micros: int
    self_hosted_ops_micros: int
    monthly_savings_micros: int
    blended_api_per_mtok_micros: int
    self_hosted_per_mtok_micros: int
    gpus_required: int
    capacity_tokens_per_day: int
    break_even_tokens_per_day: int
    break_even_tokens_per_month: int
    break_even_within_capacity: bool
    payback_months: float | None
    cheaper: str
    projection: list[MonthCost]
    sensitivity: list[SensitivityRow]


def _round(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))


def capacity_tokens_per_month_per_gpu(inp: TcoInput) -> Fraction:
    return inp.throughput_tokens_per_s * inp.utilisation * 3600 * inp.hours_per_month * inp.uptime_fraction


def gpus_required(inp: TcoInput, tokens_per_day: Fraction) -> int:
    need = tokens_per_day * inp.days_per_month / capacity_tokens_per_month_per_gpu(inp)
    return max(inp.gpu_count, math.ceil(need))


def _gpu_monthly(inp: TcoInput) -> tuple[Fraction, Fraction]:
    """(rental, amortised capex) per GPU per month, in micros."""
    rental = inp.gpu_hourly_micros * inp.hours_per_month * inp.uptime_fraction
    amortised = Fraction(inp.capex_per_gpu_micros, inp.amortisation_months)
    return rental, amortised


def self_hosted_monthly(inp: TcoInput, gpus: int) -> tuple[Fraction, Fraction, Fraction]:
    """(compute, facility overhead, ops labour) for ``gpus`` GPUs, micros per month."""
    rental, amortised = _gpu_monthly(inp)
    compute = gpus * (rental + amortised)
    return compute, compute * inp.facility_overhead_fraction, Fraction(inp.ops_labour_micros_per_month)


def api_monthly(inp: TcoInput, tokens_per_day: Fraction) -> Fraction:
    return tokens_per_day * inp.days_per_month * inp.blended_per_mtok / MTOK


def break_even_tokens_per_month(inp: TcoInput) -> Fraction:
    """Monthly tokens at which the API bill equals the self-hosted cost of the configured GPUs."""
    return sum(self_hosted_monthly(inp, inp.gpu_count), Fraction(0)) * MTOK / inp.blended_per_mtok


def _payback(inp: TcoInput) -> float | None:
    """Months until cumulative cash savings repay the up-front capex (None: not within the horizon)."""
    upfront_gpus = inp.gpu_count
    cumulative = Fraction(-inp.capex_per_gpu_micros * upfront_gpus)
    rental, _ = _gpu_monthly(inp)
    for month in range(inp.horizon_months):
        tokens = inp.tokens_per_day * (1 + inp.monthly_growth) ** month
        gpus = gpus_required(inp, tokens)
        extra_capex = max(0, gpus - upfront_gpus) * inp.capex_per_gpu_micros
        upfront_gpus = max(upfront_gpus, gpus)
        cash_compute = gpus * rental
        cash_cost = cash_compute * (1 + inp.facility_overhead_fraction) + inp.ops_labour_micros_per_month
        amortised_share = gpus * Fraction(inp.capex_per_gpu_micros, inp.amortisation_months) * inp.facility_overhead_fraction
        saving = api_monthly(inp, tokens) - cash_cost - amortised_share - extra_capex
        before = cumulative
        cumulative += saving
        if cumulative >= 0:
            if saving <= 0:
                return float(month)
            return float(month + (-before) / saving)
    return None


def _summary(inp: TcoInput) -> tuple[Fraction, Fraction, Fraction]:
    api = api_monthly(inp, inp.tokens_per_day)
    gpus = gpus_required(inp, inp.tokens_per_day)
    hosted = sum(self_hosted_monthly(inp, gpus), Fraction(0))
    return api, hosted, break_even_tokens_per_month(inp) / inp.days_per_month


_SENSITIVITY: tuple[tuple[str, tuple[Fraction, ...]], ...] = (
    ("tokens_per_day", (Fraction(1, 2), Fraction(1), Fraction(2), Fraction(4))),
    ("gpu_cost", (Fraction(3, 4), Fraction(5, 4))),
    ("throughput_tokens_per_s", (Fraction(1, 2), Fraction(3, 2))),
    ("utilisation", (Fraction(1, 2), Fraction(3, 4))),
    ("api_price", (Fraction(1, 2), Fraction(2))),
)


def _vary(inp: TcoInput, parameter: str, k: Fraction) -> TcoInput:
    if parameter == "tokens_per_day":
        return replace(inp, tokens_per_day=inp.tokens_per_day * k)
    if parameter == "gpu_cost":
        return replace(
            inp,
            gpu_hourly_micros=_round(inp.gpu_hourly_micros * k),
            capex_per_gpu_micros=_round(inp.capex_per_gpu_micros * k),
        )
    if parameter == "throughput_tokens_per_s":
        return replace(inp, throughput_tokens_per_s=inp.throughput_tokens_per_s * k)
    if parameter == "utilisation":
        return replace(inp, utilisation=min(Fraction(1), inp.utilisation * k))
    return replace(
        inp,
        api_input_per_mtok_micros=_round(inp.api_input_per_mtok_micros * k),
        api_output_per_mtok_micros=_round(inp.api_output_per_mtok_micros * k),
    )


def compute_tco(inp: TcoInput) -> TcoResult:
    inp.validate()
    api, hosted, be_day = _summary(inp)
    gpus = gpus_required(inp, inp.tokens_per_day)
    compute, overhead, ops = self_hosted_monthly(inp, gpus)
    monthly_tokens = inp.tokens_per_day * inp.days_per_month
    be_month = break_even_tokens_per_month(inp)
    capacity_month = capacity_tokens_per_month_per_gpu(inp) * inp.gpu_count
    projection = []
    for month in range(inp.horizon_months):
        tokens = inp.tokens_per_day * (1 + inp.monthly_growth) ** month
        g = gpus_required(inp, tokens)
        projection.append(
            MonthCost(
                month=month + 1,
                tokens_per_day=_round(tokens),
                api_micros=_round(api_monthly(inp, tokens)),
                self_hosted_micros=_round(sum(self_hosted_monthly(inp, g), Fraction(0))),
                gpus=g,
            )
        )
    sensitivity = []
    for parameter, multipliers in _SENSITIVITY:
        for k in multipliers:
            varied = _vary(inp, parameter, k)
            v_api, v_hosted, v_be = _summary(varied)
            sensitivity.append(
                SensitivityRow(
                    parameter=parameter,
                    multiplier=k,
                    api_monthly_micros=_round(v_api),
                    self_hosted_monthly_micros=_round(v_hosted),
                    break_even_tokens_per_day=_round(v_be),
                    cheaper="self_hosted" if v_hosted < v_api else "api",
                )
            )
    return TcoResult(
        api_monthly_micros=_round(api),
        self_hosted_monthly_micros=_round(hosted),
        self_hosted_compute_micros=_round(compute),
        self_hosted_overhead_micros=_round(overhead),
        self_hosted_ops_micros=_round(ops),
        monthly_savings_micros=_round(api - hosted),
        blended_api_per_mtok_micros=_round(inp.blended_per_mtok),
        self_hosted_per_mtok_micros=_round(hosted * MTOK / monthly_tokens) if monthly_tokens else 0,
        gpus_required=gpus,
        capacity_tokens_per_day=_round(capacity_month / inp.days_per_month),
        break_even_tokens_per_day=_round(be_day),
        break_even_tokens_per_month=_round(be_month),
        break_even_within_capacity=be_month <= capacity_month,
        payback_months=_payback(inp),
        cheaper="self_hosted" if hosted < api else "api",
        projection=projection,
        sensitivity=sensitivity,
    )
