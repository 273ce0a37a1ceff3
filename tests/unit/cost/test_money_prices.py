from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmo.cost.money import format_usd, round_half_up_div, token_cost_micros, usd_to_micros
from llmo.cost.prices import (
    NoPriceAtTimeError,
    PriceCatalog,
    PriceError,
    UnknownModelError,
    load_catalog,
    self_hosted_version,
)


def test_round_half_up_is_exact_in_integers() -> None:
    assert round_half_up_div(5, 10) == 1
    assert round_half_up_div(4, 10) == 0
    assert round_half_up_div(15, 10) == 2
    assert round_half_up_div(-15, 10) == -2
    assert round_half_up_div(10**30 + 5, 10) == 10**29 + 1


@given(st.integers(0, 10**7), st.integers(0, 10**7), st.integers(0, 10**7), st.integers(0, 10**8), st.integers(0, 10**8))
def test_record_cost_is_the_rounded_exact_rational(inp: int, out: int, cached: int, p_in: int, p_out: int) -> None:
    cost = token_cost_micros(inp, out, p_in, p_out, cached, p_in // 2)
    exact = Decimal(inp * p_in + cached * (p_in // 2) + out * p_out) / Decimal(1_000_000)
    assert abs(Decimal(cost) - exact) <= Decimal("0.5")


def test_cached_tokens_use_the_cached_price_and_are_not_part_of_input() -> None:
    # 1M input at $2.50 + 1M cached at $1.25 + 1M output at $10 = $13.75
    assert token_cost_micros(1_000_000, 1_000_000, 2_500_000, 10_000_000, 1_000_000, 1_250_000) == 13_750_000


def test_negative_tokens_are_refused() -> None:
    with pytest.raises(ValueError):
        token_cost_micros(-1, 0, 1, 1)


def test_usd_parsing_is_exact_and_refuses_floats() -> None:
    assert usd_to_micros("2.50") == 2_500_000
    assert usd_to_micros("0.075") == 75_000
    assert usd_to_micros(3) == 3_000_000
    with pytest.raises(TypeError):
        usd_to_micros(0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        usd_to_micros("ten dollars")
    assert format_usd(1_234_567) == "$1.23"


def test_shipped_catalog_prices_a_known_model_and_honours_effective_dates() -> None:
    catalog = load_catalog()
    before = catalog.lookup("o3", datetime(2025, 5, 1, tzinfo=UTC))
    after = catalog.lookup("o3", datetime(2025, 7, 1, tzinfo=UTC))
    assert before.output_per_mtok == 40_000_000
    assert after.output_per_mtok == 8_000_000
    # the same usage is priced by the version in force at its time
    assert before.cost_micros(1000, 1000) == 50_000
    assert after.cost_micros(1000, 1000) == 10_000
    assert catalog.lookup("gpt-4o-2024-08-06", datetime(2025, 1, 1, tzinfo=UTC)).model == "gpt-4o"


def test_unknown_model_and_time_before_first_price() -> None:
    catalog = load_catalog()
    with pytest.raises(UnknownModelError):
        catalog.lookup("no-such-model", datetime(2025, 1, 1, tzinfo=UTC))
    with pytest.raises(NoPriceAtTimeError):
        catalog.lookup("gpt-5", datetime(2020, 1, 1, tzinfo=UTC))


def test_override_file_adds_a_version_without_rewriting_history(tmp_path: Path) -> None:
    override = tmp_path / "prices.yaml"
    override.write_text(
        "models:\n"
        "  - model: gpt-4o-mini\n"
        "    provider: openai\n"
        "    prices:\n"
        "      - {effective_from: '2026-06-01', input_per_mtok_usd: '0.10', output_per_mtok_usd: '0.40'}\n"
        "  - model: house-model\n"
        "    provider: acme\n"
        "    prices:\n"
        "      - {effective_from: '2026-01-01', input_per_mtok_usd: 1.5, output_per_mtok_usd: '3'}\n"
    )
    catalog = load_catalog([override])
    assert catalog.lookup("gpt-4o-mini", datetime(2026, 1, 1, tzinfo=UTC)).input_per_mtok == 150_000
    assert catalog.lookup("gpt-4o-mini", datetime(2026, 7, 1, tzinfo=UTC)).input_per_mtok == 100_000
    house = catalog.lookup("house-model", datetime(2026, 2, 1, tzinfo=UTC))
    assert (house.input_per_mtok, house.cached_input_per_mtok, house.output_per_mtok) == (1_500_000, 1_500_000, 3_000_000)


def test_self_hosted_price_from_compute() -> None:
    # $1.50/h at 2000 tok/s, fully used: 1.5e6 * 1e6 / (2000 * 3600) = 208,333.3 micros per 1M tokens
    version = self_hosted_version(
        "m", "self-hosted", {"effective_from": "2026-01-01", "gpu_hourly_usd": "1.50", "output_tokens_per_s": 2000}
    )
    assert version.output_per_mtok == 208_333
    assert version.input_per_mtok == 208_333
    two_gpus_half_used = self_hosted_version(
        "m",
        "self-hosted",
        {"effective_from": "2026-01-01", "gpu_hourly_usd": "1.50", "gpu_count": 2, "output_tokens_per_s": 2000, "utilisation": 0.5},
    )
    assert two_gpus_half_used.output_per_mtok == 833_333


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"models": [{"provider": "x", "prices": []}]},
        {"models": [{"model": "m", "provider": "x"}]},
        {"models": [{"model": "m", "provider": "x", "prices": [{"effective_from": "2026-01-01", "input_per_mtok_usd": "-1", "output_per_mtok_usd": "1"}]}]},
        {"models": [{"model": "m", "provider": "x", "prices": [{"effective_from": "soon", "input_per_mtok_usd": "1", "output_per_mtok_usd": "1"}]}]},
        {"models": [{"model": "m", "provider": "x", "self_hosted": [{"effective_from": "2026-01-01", "gpu_hourly_usd": "1", "output_tokens_per_s": 0}]}]},
    ],
)
def test_invalid_catalog_entries_are_rejected_with_a_clear_error(doc: dict[str, object]) -> None:
    with pytest.raises(PriceError):
        PriceCatalog().merge_document(doc)
