"""The evaluation statistics: hand-computed small cases, agreement with scipy/sklearn, degenerate input,
and simulations where the truth is known (bootstrap coverage, judge noise against alpha and flip rate)."""

from __future__ import annotations

import math
import warnings

import krippendorff
import numpy as np
import pytest
from scipy import stats as sps
from sklearn import metrics as skm

from llmo.evaluation import stats


def test_summary_of_a_small_sample() -> None:
    s = stats.summarize([1.0, 2.0, 3.0, 4.0], passed=[True, False, True, True])
    assert s.count == 4
    assert s.mean == 2.5
    assert s.stddev == pytest.approx(math.sqrt(5 / 3))
    assert (s.min, s.max) == (1.0, 4.0)
    assert s.p10 == pytest.approx(1.3)
    assert s.p50 == 2.5
    assert 1.0 <= s.ci_low < s.mean < s.ci_high <= 4.0
    assert s.pass_rate == 0.75
    assert stats.summarize([1.0, 2.0]).pass_rate is None


def test_summary_of_one_score_has_no_spread() -> None:
    s = stats.summarize([0.7])
    assert (s.count, s.mean, s.stddev, s.ci_low, s.ci_high) == (1, 0.7, 0.0, 0.7, 0.7)


@pytest.mark.parametrize("scores", [[], [0.5, math.nan]])
def test_summary_rejects_empty_or_nan_scores(scores: list[float]) -> None:
    with pytest.raises(ValueError):
        stats.summarize(scores)


def test_summary_rejects_pass_flags_of_another_length() -> None:
    with pytest.raises(ValueError, match="passed"):
        stats.summarize([0.1, 0.2], passed=[True])


def test_bootstrap_is_reproducible_and_widens_with_confidence() -> None:
    values = np.random.default_rng(1).normal(size=50)
    assert stats.bootstrap_ci(values, seed=3) == stats.bootstrap_ci(values, seed=3)
    low90, high90 = stats.bootstrap_ci(values, confidence=0.90)
    low99, high99 = stats.bootstrap_ci(values, confidence=0.99)
    assert low99 < low90 < high90 < high99


def test_bootstrap_ci_is_close_to_scipys_percentile_bootstrap() -> None:
    values = np.random.default_rng(2).gamma(2.0, size=200)
    ours = stats.bootstrap_ci(values, resamples=5000)
    theirs = sps.bootstrap((values,), np.mean, method="percentile", n_resamples=5000, random_state=9)
    width = theirs.confidence_interval.high - theirs.confidence_interval.low
    assert ours[0] == pytest.approx(theirs.confidence_interval.low, abs=0.1 * width)
    assert ours[1] == pytest.approx(theirs.confidence_interval.high, abs=0.1 * width)


def test_bootstrap_takes_a_statistic_without_an_axis_argument() -> None:
    values = [1.0, 2.0, 3.0, 10.0, 11.0]
    low, high = stats.bootstrap_ci(values, lambda v: float(sorted(v)[len(v) // 2]), resamples=300)
    assert 1.0 <= low <= 3.0 <= high <= 11.0


def test_bootstrap_ci_of_the_mean_covers_the_truth_about_95_percent_of_the_time() -> None:
    a, b = 2.0, 5.0
    truth = a / (a + b)
    rng = np.random.default_rng(20240601)
    trials = 300
    covered = 0
    for trial in range(trials):
        sample = rng.beta(a, b, size=100)
        low, high = stats.bootstrap_ci(sample, seed=trial)
        covered += low <= truth <= high
    assert 0.90 <= covered / trials <= 0.99


def test_paired_comparison_counts_wins_ties_and_losses() -> None:
    base = [0.5, 0.5, 0.5, 0.5]
    candidate = [0.7, 0.5, 0.4, 0.6]
    c = stats.paired_comparison(base, candidate)
    assert (c.paired, c.wins, c.ties, c.losses) == (4, 2, 1, 1)
    assert c.win_rate == 0.625
    assert (c.base_mean, c.candidate_mean) == (0.5, pytest.approx(0.55))
    assert c.mean_delta == pytest.approx(0.05)
    assert c.ci_low <= c.mean_delta <= c.ci_high

    lower = stats.paired_comparison(base, candidate, lower_is_better=True)
    assert (lower.wins, lower.ties, lower.losses) == (1, 1, 2)
    assert lower.win_rate == 0.375
    assert lower.mean_delta == pytest.approx(0.05)


def test_paired_comparison_ci_excludes_zero_only_for_a_real_improvement() -> None:
    rng = np.random.default_rng(5)
    base = rng.uniform(0.3, 0.7, size=200)
    better = stats.paired_comparison(base, base + 0.05 + rng.normal(0, 0.02, size=200))
    assert better.ci_low > 0
    same = stats.paired_comparison(base, base)
    assert (same.ties, same.ci_low, same.ci_high, same.win_rate) == (200, 0.0, 0.0, 0.5)


def test_paired_comparison_needs_paired_scores() -> None:
    with pytest.raises(ValueError, match="equal"):
        stats.paired_comparison([0.1, 0.2], [0.1])
    with pytest.raises(ValueError):
        stats.paired_comparison([], [])


def test_krippendorff_alpha_hand_computed() -> None:
    # Interval: coincidences o12 = o21 = 2 of n = 4 values, D_o = 1, D_e = 8/12, alpha = 1 - 1.5.
    assert stats.krippendorff_alpha([[1, 2], [2, 1]]) == pytest.approx(-0.5)
    # Nominal: o11 = 4, o12 = o21 = 1, n1 = 5, n2 = 1; D_o = 2/6 = D_e = 10/30.
    assert stats.krippendorff_alpha([[1, 1, 2], [1, 1, 1]], level="nominal") == pytest.approx(0.0)
    assert stats.krippendorff_alpha([[1, 2, 3, math.nan], [1, 2, 3, 4]]) == pytest.approx(1.0)


def test_krippendorff_alpha_of_continuous_scores_matches_the_package() -> None:
    # Past PACKAGE_ALPHA_MAX_VALUES distinct values interval alpha is computed in closed form.
    rng = np.random.default_rng(6)
    ratings = rng.uniform(size=(4, 30)) + rng.uniform(size=30)
    ratings[rng.uniform(size=ratings.shape) < 0.2] = math.nan
    assert np.unique(ratings[~np.isnan(ratings)]).size > stats.PACKAGE_ALPHA_MAX_VALUES
    expected = krippendorff.alpha(reliability_data=ratings, level_of_measurement="interval")
    assert stats.krippendorff_alpha(ratings) == pytest.approx(expected)


@pytest.mark.parametrize("ratings", [
    [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]],          # no variance
    [[1.0, math.nan], [math.nan, 2.0]],          # no unit rated twice
    [[1.0, 2.0, math.nan], [1.0, math.nan, 3.0]],  # the only pairable unit agrees: D_e = 0
])
def test_krippendorff_alpha_is_nan_when_undefined(ratings: list[list[float]]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(stats.krippendorff_alpha(ratings))


def test_krippendorff_alpha_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="level"):
        stats.krippendorff_alpha([[1, 2], [1, 2]], level="cardinal")
    with pytest.raises(ValueError, match="coders x units"):
        stats.krippendorff_alpha([1, 2, 3])


def test_flip_rate_counts_units_whose_verdicts_disagree() -> None:
    assert stats.flip_rate([[True, True, True], [True, False, True], [False, False, False],
                            [True, None, None]]) == pytest.approx(1 / 3)
    assert stats.flip_rate([["PASS", "PASS"], ["PASS", "FAIL"]]) == 0.5
    assert stats.flip_rate(np.array([[1.0, math.nan, 1.0], [0.0, 1.0, math.nan]])) == 0.5
    assert math.isnan(stats.flip_rate([[True, None], [None, False]]))


def test_rank_correlations_hand_computed_and_as_scipy() -> None:
    assert stats.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert stats.kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    rng = np.random.default_rng(7)
    x = rng.normal(size=60)
    y = x + rng.normal(size=60)
    y_ties = np.round(y)
    assert stats.spearman(x, y) == pytest.approx(sps.spearmanr(x, y).statistic)
    assert stats.kendall_tau(x, y_ties) == pytest.approx(sps.kendalltau(x, y_ties).statistic)
    assert stats.pearson(x, y) == pytest.approx(sps.pearsonr(x, y).statistic)


def test_correlations_skip_nan_pairs_and_are_nan_for_constant_input() -> None:
    x = [1.0, 2.0, math.nan, 4.0, 5.0]
    y = [2.0, 1.0, 3.0, math.nan, 6.0]
    assert stats.spearman(x, y) == pytest.approx(sps.spearmanr([1, 2, 5], [2, 1, 6]).statistic)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(stats.spearman([1, 2, 3], [4, 4, 4]))
        assert math.isnan(stats.kendall_tau([3, 3, 3], [1, 2, 3]))
        assert math.isnan(stats.spearman([1], [2]))


def test_quadratic_kappa() -> None:
    assert stats.quadratic_kappa([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    # Two categories, total disagreement: sum(w O) = 1, sum(w E) = 0.5.
    assert stats.quadratic_kappa([0, 1], [1, 0]) == pytest.approx(-1.0)
    rng = np.random.default_rng(3)
    a = rng.integers(1, 6, size=80)
    b = np.clip(a + rng.integers(-1, 2, size=80), 1, 5)
    assert stats.quadratic_kappa(a, b) == pytest.approx(skm.cohen_kappa_score(a, b, weights="quadratic"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(stats.quadratic_kappa([3, 3, 3], [3, 3, 3]))


def test_mean_absolute_error_skips_nan_pairs() -> None:
    assert stats.mean_absolute_error([0.0, 1.0, math.nan], [0.5, 0.5, 1.0]) == 0.5
    assert math.isnan(stats.mean_absolute_error([math.nan], [1.0]))


def test_grouped_correlation_correlates_inside_groups_then_averages() -> None:
    # Inside each document the metric ranks summaries backwards, though across documents it looks good.
    metric = [1, 2, 3, 10, 11, 12, 5, 5]
    human = [3, 2, 1, 12, 11, 10, 1, 2]
    groups = ["a", "a", "a", "b", "b", "b", "c", "c"]
    per_group, mean = stats.grouped_correlation(metric, human, groups, "spearman")
    assert per_group["a"] == pytest.approx(-1.0)
    assert per_group["b"] == pytest.approx(-1.0)
    assert math.isnan(per_group["c"])  # constant metric inside the group: left out of the mean
    assert mean == pytest.approx(-1.0)
    assert stats.spearman(metric, human) > 0
    _, tau = stats.grouped_correlation(metric, human, groups, "kendall")
    assert tau == pytest.approx(-1.0)
    _, none = stats.grouped_correlation([1, 1], [1, 2], ["x", "x"])
    assert math.isnan(none)


def test_binary_metrics_hand_computed() -> None:
    m = stats.binary_metrics([0.9, 0.8, 0.3, 0.6, 0.1], [1, 1, 1, 0, 0], threshold=0.5)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["auroc"] == pytest.approx(5 / 6)  # 5 of the 6 positive-negative pairs ordered right
    one_class = stats.binary_metrics([0.2, 0.9], [True, True])
    assert math.isnan(one_class["auroc"])
    assert one_class["recall"] == 0.5


def test_psi_hand_computed_on_unit_bins() -> None:
    reference = [0.1, 0.2, 0.7, 0.8]  # halves: 0.5 / 0.5
    current = [0.1, 0.6, 0.7, 0.8]    # 0.25 / 0.75
    expected = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert stats.psi(reference, current, bins=2, edges="unit") == pytest.approx(expected)
    assert stats.psi(reference, reference, bins=2, edges="unit") == 0.0


def test_psi_grows_with_the_shift_and_reads_as_severity() -> None:
    rng = np.random.default_rng(11)
    reference = rng.normal(size=2000)
    values = [stats.psi(reference, rng.normal(loc=shift, size=2000)) for shift in (0.0, 0.3, 1.0)]
    assert values[0] < values[1] < values[2]
    assert [stats.drift_severity(v) for v in values] == ["none", "moderate", "severe"]
    assert [stats.drift_severity(v) for v in (0.0999, 0.1, 0.2499, 0.25)] == ["none", "moderate", "moderate", "severe"]


def test_psi_sees_drift_away_from_a_constant_reference_and_ignores_nan() -> None:
    assert stats.psi([1.0] * 50, [1.0] * 49 + [math.nan]) == 0.0
    assert stats.drift_severity(stats.psi([1.0] * 50, [0.8] * 50)) == "severe"
    assert stats.drift_severity(stats.psi([0.5] * 50, [0.6] * 50)) == "severe"
    with pytest.raises(ValueError):
        stats.psi([], [0.5])


def test_ks_2samp_agrees_with_scipy() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.uniform(size=300), rng.uniform(0.1, 1.1, size=300)
    expected = sps.ks_2samp(a, b)
    assert stats.ks_2samp(a, b) == (pytest.approx(expected.statistic), pytest.approx(expected.pvalue))


def test_distribution_lists_bins_and_counts() -> None:
    assert stats.distribution([0.0, 0.5, 1.0], bins=2) == [(0.0, 0.5, 1), (0.5, 1.0, 2)]
    assert sum(count for _, _, count in stats.distribution(np.random.default_rng(0).normal(size=97))) == 97
    assert stats.distribution([]) == []


def test_a_noisier_judge_agrees_less_with_itself() -> None:
    rng = np.random.default_rng(8)
    quality = rng.uniform(size=200)
    alphas, flips = [], []
    for noise in (0.05, 0.2, 0.5):
        repeats = quality + rng.normal(0.0, noise, size=(5, quality.size))  # repeats (coders) x units
        alphas.append(stats.krippendorff_alpha(repeats))
        flips.append(stats.flip_rate((repeats >= 0.5).T))
    assert alphas[0] > alphas[1] > alphas[2]
    assert flips[0] < flips[1] < flips[2]
    assert alphas[0] > 0.9 and alphas[2] < 0.5
