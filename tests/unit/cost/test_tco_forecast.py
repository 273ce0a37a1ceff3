from __future__ import annotations

from dataclasses import replace
from datetime import date, timedelta
from fractions import Fraction

import pytest

from llmo.cost.forecast import fill_days, forecast
from llmo.cost.reports import kpis, percentile
from llmo.cost.tco import TcoInput, TcoInputError, compute_tco

# induwara.lk "Self-Hosting LLM Cost Calculator (vs API Break-Even)", its published example:
# 120M input + 40M output tokens/month, API $0.25 / $2.00 per 1M, one GPU at $1.19/h on demand,
# 100% of the month (24 x 30.4 = 729.6 h), 15% overhead on GPU cost, 2,500 tok/s.
# The calculator shows: API $110.00/month, self-host $998.46/month, break-even 1.45B tokens/month.
INDUWARA = TcoInput(
    tokens_per_day=Fraction(160_000_000) / Fraction("30.4"),
    input_fraction=Fraction(3, 4),
    api_input_per_mtok_micros=250_000,
    api_output_per_mtok_micros=2_000_000,
    throughput_tokens_per_s=Fraction(2500),
    gpu_count=1,
    gpu_hourly_micros=1_190_000,
    hours_per_month=Fraction("729.6"),
    facility_overhead_fraction=Fraction("0.15"),
)


def test_reproduces_public_calculator_break_even_within_one_percent() -> None:
    result = compute_tco(INDUWARA)
    assert result.api_monthly_micros == 110_000_000
    assert result.self_hosted_monthly_micros == 998_457_600  # the calculator shows $998.46
    assert abs(result.break_even_tokens_per_month - 1_450_000_000) / 1_450_000_000 < 0.01
    assert result.break_even_tokens_per_month == 1_452_301_964
    assert result.cheaper == "api"
    assert result.break_even_within_capacity


def test_llmtco_methodology_examples() -> None:
    # llmtco.com/methodology: $1.50/h x 730 h x 30% = $328.50/month; blended $3 per 1M
    inp = replace(
        INDUWARA,
        gpu_hourly_micros=1_500_000,
        hours_per_month=Fraction(730),
        uptime_fraction=Fraction(3, 10),
        facility_overhead_fraction=Fraction(0),
        input_fraction=Fraction(1, 2),
        api_input_per_mtok_micros=3_000_000,
        api_output_per_mtok_micros=3_000_000,
    )
    result = compute_tco(inp)
    assert result.self_hosted_monthly_micros == 328_500_000
    assert result.break_even_tokens_per_month == 109_500_000


def test_capex_payback_and_gpu_scaling() -> None:
    inp = TcoInput(
        tokens_per_day=Fraction(2_000_000_000),
        input_fraction=Fraction(4, 5),
        api_input_per_mtok_micros=2_500_000,
        api_output_per_mtok_micros=10_000_000,
        throughput_tokens_per_s=Fraction(3000),
        gpu_count=2,
        capex_per_gpu_micros=30_000_000_000,
        amortisation_months=36,
        utilisation=Fraction(1, 2),
        ops_labour_micros_per_month=15_000_000_000,
    )
    result = compute_tco(inp)
    # 2e9 tokens/day needs 2e9 / (3000 * 0.5 * 86400) = 15.4 -> 16 GPUs
    assert result.gpus_required == 16
    assert result.cheaper == "self_hosted"
    assert result.payback_months is not None and 0 < result.payback_months < 36
    assert result.monthly_savings_micros == result.api_monthly_micros - result.self_hosted_monthly_micros
    names = {row.parameter for row in result.sensitivity}
    assert names == {"tokens_per_day", "gpu_cost", "throughput_tokens_per_s", "utilisation", "api_price"}
    half_price = next(r for r in result.sensitivity if r.parameter == "api_price" and r.multiplier == Fraction(1, 2))
    assert half_price.break_even_tokens_per_day == pytest.approx(2 * result.break_even_tokens_per_day, abs=1)


def test_growth_projection_compounds() -> None:
    result = compute_tco(replace(INDUWARA, monthly_growth=Fraction(1, 10), horizon_months=3))
    assert [m.month for m in result.projection] == [1, 2, 3]
    assert result.projection[2].tokens_per_day == round(INDUWARA.tokens_per_day * Fraction(121, 100))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"input_fraction": Fraction(3, 2)}, "input_fraction"),
        ({"throughput_tokens_per_s": Fraction(0)}, "throughput_tokens_per_s"),
        ({"gpu_hourly_micros": 0}, "gpu_cost"),
        ({"utilisation": Fraction(0)}, "utilisation"),
        ({"api_input_per_mtok_micros": 0, "api_output_per_mtok_micros": 0}, "api_price"),
    ],
)
def test_invalid_tco_inputs(change: dict[str, object], field: str) -> None:
    with pytest.raises(TcoInputError) as info:
        compute_tco(replace(INDUWARA, **change))  # type: ignore[arg-type]
    assert info.value.field == field


def test_forecast_follows_a_linear_trend_with_a_band() -> None:
    start = date(2026, 1, 1)
    history = [(start + timedelta(days=i), 1_000_000 + 10_000 * i + (5_000 if i % 2 else -5_000)) for i in range(30)]
    result = forecast(history, 7)
    assert len(result.points) == 7
    assert result.points[0].day == date(2026, 1, 31)
    assert result.slope_micros_per_day == pytest.approx(10_000, rel=0.05)
    first = result.points[0]
    assert first.lower_micros < first.expected_micros < first.upper_micros
    assert first.expected_micros == pytest.approx(1_300_000, rel=0.01)
    assert result.total_lower_micros <= result.total_expected_micros <= result.total_upper_micros


def test_forecast_of_flat_history_has_no_band_and_rejects_bad_args() -> None:
    history = fill_days({date(2026, 1, 2): 500}, date(2026, 1, 1), date(2026, 1, 3))
    assert [v for _, v in history] == [0, 500, 0]
    flat = forecast([(date(2026, 1, 1), 7), (date(2026, 1, 2), 7), (date(2026, 1, 3), 7)], 2)
    assert [(p.lower_micros, p.expected_micros, p.upper_micros) for p in flat.points] == [(7, 7, 7), (7, 7, 7)]
    with pytest.raises(ValueError):
        forecast(history, 0)
    with pytest.raises(ValueError):
        forecast([], 3)


def test_percentiles_and_kpis() -> None:
    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile([], 50) == 0.0
    figures = kpis(requests=3, total_tokens=3_000, cost_micros=1_000)
    assert figures.tokens_per_dollar == 3_000_000.0
    assert figures.cost_per_request_micros == 333
    assert figures.cost_per_1k_requests_micros == 333_333
    assert kpis(0, 0, 0).tokens_per_dollar == 0.0
