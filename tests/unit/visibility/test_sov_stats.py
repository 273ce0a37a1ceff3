import math

import numpy as np
import pytest

from llmo.visibility.mentions import AnswerAnalysis, BrandSpec
from llmo.visibility.sov_stats import Answer, brand_metrics, change_test, simulate_coverage

BRANDS = [BrandSpec("Acme", is_project_brand=True), BrandSpec("Globex"), BrandSpec("Initech")]


def answer(
    prompt: str,
    sample: int,
    named: list[str],
    cited: tuple[str, ...] = (),
    *,
    engine: str = "chatgpt",
    weight: float = 1.0,
) -> Answer:
    """An answer naming `named` in that order."""
    analysis = AnswerAnalysis(
        mentioned={b.name: b.name in named for b in BRANDS},
        positions={name: i + 1 for i, name in enumerate(named)},
        cited={b.name: b.name in cited for b in BRANDS},
        citations=[],
    )
    return Answer(prompt, engine, sample, analysis, weight)


def by_brand(results: list) -> dict:
    return {r.brand: r for r in results}


def random_run(
    rates: dict[str, float], prompts: int, samples: int, seed: int, prefix: str = "p"
) -> list[Answer]:
    rng = np.random.default_rng(seed)
    return [
        answer(f"{prefix}{p}", s, [b for b, rate in rates.items() if rng.random() < rate])
        for p in range(prompts)
        for s in range(samples)
    ]


def test_point_estimates_match_hand_computation() -> None:
    answers = [
        answer("p1", 0, ["Globex", "Acme"], cited=("Acme",), weight=3.0),
        answer("p1", 1, ["Acme"], weight=3.0),
        answer("p2", 0, ["Globex"], cited=("Globex",)),
        answer("p2", 1, []),
    ]
    m = by_brand(brand_metrics(answers, BRANDS, resamples=200))
    acme, globex = m["Acme"], m["Globex"]
    assert acme.answers == 4
    assert acme.mention_rate.estimate == pytest.approx(2 / 4)
    assert acme.mention_sov.estimate == pytest.approx(2 / 4)  # 2 of 4 brand-answer mentions
    assert acme.answer_sov.estimate == pytest.approx(2 / 3)  # 3 answers name some brand
    assert acme.citation_rate.estimate == pytest.approx(1 / 4)
    assert acme.citation_share.estimate == pytest.approx(1 / 2)
    # positions: Acme 2 then 1, Globex 1 and 1 -> weights 1.5 vs 2
    assert acme.position_weighted_sov.estimate == pytest.approx(1.5 / 3.5)
    assert globex.position_weighted_sov.estimate == pytest.approx(2 / 3.5)
    # demand weights: p1 answers weigh 3: Acme 3+3, Globex 3+1
    assert acme.demand_weighted_sov.estimate == pytest.approx(6 / 10)
    assert acme.mean_position == pytest.approx(1.5)
    assert m["Initech"].mean_position is None
    assert m["Initech"].mention_sov.estimate == 0.0


def test_project_brand_first_then_competitors_by_mention_sov() -> None:
    answers = random_run({"Acme": 0.1, "Globex": 0.3, "Initech": 0.7}, prompts=20, samples=3, seed=1)
    order = [r.brand for r in brand_metrics(answers, BRANDS, resamples=100)]
    assert order == ["Acme", "Initech", "Globex"]


def test_intervals_contain_estimate_and_are_reproducible() -> None:
    answers = random_run({"Acme": 0.4, "Globex": 0.2, "Initech": 0.5}, prompts=30, samples=5, seed=2)
    first = brand_metrics(answers, BRANDS, seed=7)
    assert first == brand_metrics(answers, BRANDS, seed=7)
    for r in first:
        for name in (
            "mention_rate",
            "mention_sov",
            "answer_sov",
            "citation_rate",
            "citation_share",
            "position_weighted_sov",
            "demand_weighted_sov",
        ):
            iv = getattr(r, name)
            assert 0.0 <= iv.low <= iv.estimate <= iv.high <= 1.0, (r.brand, name, iv)
    acme = by_brand(first)["Acme"].mention_rate
    assert 0.02 < acme.high - acme.low < 0.3


def test_engine_filter() -> None:
    answers = [
        answer("p1", 0, ["Acme"], engine="chatgpt"),
        answer("p1", 0, [], engine="perplexity"),
        answer("p2", 0, ["Acme"], engine="chatgpt"),
        answer("p2", 0, ["Globex"], engine="perplexity"),
    ]
    assert by_brand(brand_metrics(answers, BRANDS, engine="chatgpt"))["Acme"].mention_rate.estimate == 1.0
    perplexity = by_brand(brand_metrics(answers, BRANDS, engine="perplexity"))
    assert perplexity["Acme"].mention_rate.estimate == 0.0 and perplexity["Acme"].answers == 2
    assert by_brand(brand_metrics(answers, BRANDS))["Acme"].mention_rate.estimate == 0.5


def test_prompt_clustering_widens_the_interval() -> None:
    # same 40% mention rate; clustered: each prompt always or never names Acme
    clustered = [answer(f"p{p}", s, ["Acme"] if p % 5 < 2 else []) for p in range(40) for s in range(5)]
    spread = [answer(f"p{p}", s, ["Acme"] if s % 5 < 2 else []) for p in range(40) for s in range(5)]
    wide = by_brand(brand_metrics(clustered, BRANDS))["Acme"].mention_rate
    narrow = by_brand(brand_metrics(spread, BRANDS))["Acme"].mention_rate
    assert wide.estimate == narrow.estimate == pytest.approx(0.4)
    assert (wide.high - wide.low) > 1.5 * (narrow.high - narrow.low)


def test_never_and_always_mentioned_get_a_wilson_interval_not_a_point() -> None:
    answers = [answer(f"p{p}", s, ["Globex"]) for p in range(50) for s in range(5)]
    m = by_brand(brand_metrics(answers, BRANDS))
    never = m["Acme"].mention_rate
    assert never.estimate == 0.0 and never.low == 0.0 and 0.005 < never.high < 0.03
    always = m["Globex"].mention_rate
    assert always.estimate == 1.0 and always.high == 1.0 and 0.97 < always.low < 0.995


def test_zero_denominators_are_zero_and_no_data_is_unknown() -> None:
    nothing_named = [answer("p1", 0, []), answer("p2", 0, [])]
    m = by_brand(brand_metrics(nothing_named, BRANDS))
    assert m["Acme"].mention_sov.estimate == 0.0 and m["Acme"].answer_sov.estimate == 0.0
    assert m["Acme"].mention_sov.high == 1.0  # no brand named at all: SoV unknown
    empty = brand_metrics([], BRANDS)
    assert [r.answers for r in empty] == [0, 0, 0]
    assert all(r.mention_rate.low == 0.0 and r.mention_rate.high == 1.0 for r in empty)


def test_demand_weights_move_demand_weighted_sov_only() -> None:
    answers = [answer(f"big{s}", 0, ["Acme"], weight=9.0) for s in range(10)]
    answers += [answer(f"small{s}", 0, ["Globex"], weight=1.0) for s in range(10)]
    acme = by_brand(brand_metrics(answers, BRANDS))["Acme"]
    assert acme.mention_sov.estimate == pytest.approx(0.5)
    assert acme.demand_weighted_sov.estimate == pytest.approx(0.9)
    assert acme.demand_weighted_sov.low > 0.6


def test_change_test_identical_runs_not_significant() -> None:
    run = random_run({"Acme": 0.4, "Globex": 0.3, "Initech": 0.2}, prompts=20, samples=3, seed=3)
    result = change_test(run, run, "Acme", BRANDS, resamples=500)
    assert result.difference == 0.0 and result.p_value > 0.5 and not result.significant
    assert result.low <= 0.0 <= result.high


@pytest.mark.parametrize("same_prompts", [True, False])
def test_change_test_detects_a_real_shift(same_prompts: bool) -> None:
    before = random_run({"Acme": 0.2, "Globex": 0.5}, prompts=30, samples=4, seed=4)
    after = random_run(
        {"Acme": 0.6, "Globex": 0.5}, prompts=30, samples=4, seed=5, prefix="p" if same_prompts else "q"
    )
    result = change_test(before, after, "Acme", BRANDS, resamples=1000)
    assert result.difference == pytest.approx(result.after - result.before)
    assert result.difference > 0.25 and result.significant and result.p_value < 0.01
    assert 0.0 < result.low < result.difference < result.high
    sov = change_test(before, after, "Acme", BRANDS, metric="mention_sov", resamples=500)
    assert sov.metric == "mention_sov" and sov.significant


def test_change_test_null_rejection_rate_is_about_alpha() -> None:
    rates = {"Acme": 0.35, "Globex": 0.5}
    rejections = sum(
        change_test(
            random_run(rates, 15, 3, seed=2 * k),
            random_run(rates, 15, 3, seed=2 * k + 1),
            "Acme",
            BRANDS,
            resamples=300,
            seed=k,
        ).significant
        for k in range(120)
    )
    # 5% of 120 = 6; allow binomial noise
    assert rejections <= 15


def test_change_test_rejects_unknown_metric_or_brand() -> None:
    run = [answer("p1", 0, ["Acme"])]
    with pytest.raises(ValueError, match="metric"):
        change_test(run, run, "Acme", BRANDS, metric="vibes")
    with pytest.raises(ValueError, match="brand"):
        change_test(run, run, "Nobody", BRANDS)
    with pytest.raises(ValueError, match="answer"):
        change_test([], run, "Acme", BRANDS)


@pytest.mark.parametrize(("rate", "spread"), [(0.3, 0.0), (0.3, 0.15)])
def test_interval_coverage_is_close_to_nominal(rate: float, spread: float) -> None:
    # 5 samples x 50 prompts, as in a typical tracking run; 3.5 binomial standard errors of tolerance
    runs = 1000
    result = simulate_coverage(rate, prompts=50, samples=5, runs=runs, prompt_spread=spread, seed=11)
    tolerance = 3.5 * math.sqrt(0.95 * 0.05 / runs)
    assert abs(result.coverage - 0.95) < tolerance, result
    assert result.runs == runs and 0.0 < result.mean_width < 0.3


def test_two_stage_bootstrap_is_wider_than_prompt_bootstrap() -> None:
    prompt_only = simulate_coverage(0.3, 50, 5, runs=60, seed=1, resamples=300)
    two_stage = simulate_coverage(0.3, 50, 5, runs=60, seed=1, resamples=300, two_stage=True)
    assert two_stage.mean_width > 1.2 * prompt_only.mean_width


def test_simulate_coverage_validates_inputs() -> None:
    with pytest.raises(ValueError):
        simulate_coverage(0.1, 10, 5, runs=1, prompt_spread=0.5)
    with pytest.raises(ValueError):
        simulate_coverage(1.5, 10, 5, runs=1)
