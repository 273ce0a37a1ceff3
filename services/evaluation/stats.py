"""Statistics of the evaluation service: summaries with bootstrap confidence intervals, paired run
comparisons, judge agreement (Krippendorff's alpha, flip rate), metric-vs-human correlations, binary
detection metrics and score drift (PSI, Kolmogorov-Smirnov).

Pure numpy/scipy/sklearn on in-memory arrays; callers on the event loop run the heavy ones (bootstraps)
with asyncio.to_thread. Functions that can be undefined on degenerate input (constant values, a single
class, no pairable units) return NaN rather than raise, so one odd metric does not fail a whole report;
empty input where a value is required raises ValueError.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import krippendorff
import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats as sps
from sklearn import metrics as skm

FloatArray = NDArray[np.float64]
CorrelationMethod = Literal["spearman", "kendall", "pearson"]

PSI_EPSILON = 1e-4
"""Floor of a bin's share in PSI, so an empty bin on one side gives a large but finite term."""


def _floats(values: ArrayLike, name: str = "values") -> FloatArray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _check_bootstrap(confidence: float, resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")


def _percentile_interval(replicates: FloatArray, confidence: float) -> tuple[float, float]:
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return float(low), float(high)


def resample_ci(count: int, statistic: Callable[[NDArray[np.intp]], float], *, confidence: float = 0.95,
                resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic(indices)` over `resamples` draws of `count` indices with
    replacement (for statistics of several aligned arrays, or of resampled groups). Replicates that come
    out NaN (e.g. a correlation of a constant resample) are left out; all NaN gives (NaN, NaN)."""
    _check_bootstrap(confidence, resamples)
    if count < 1:
        raise ValueError("cannot bootstrap an empty sample")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, count, size=(resamples, count))
    replicates = np.array([statistic(row) for row in draws], dtype=float)
    return _percentile_interval(replicates, confidence)


def bootstrap_ci(values: ArrayLike, statistic: Callable[..., Any] = np.mean, *, confidence: float = 0.95,
                 resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic(values)`. One value: (value, value). `statistic` is called
    once on a resamples x n matrix with `axis=1` when it accepts that (numpy reductions do), otherwise
    once per resample."""
    array = _floats(values)
    _check_bootstrap(confidence, resamples)
    if array.size == 0:
        raise ValueError("cannot bootstrap an empty sample")
    if array.size == 1:
        value = float(statistic(array))
        return value, value
    rng = np.random.default_rng(seed)
    matrix = array[rng.integers(0, array.size, size=(resamples, array.size))]
    try:
        replicates = np.asarray(statistic(matrix, axis=1), dtype=float)
    except TypeError:
        replicates = np.array([])
    if replicates.shape != (resamples,):
        replicates = np.array([float(statistic(row)) for row in matrix], dtype=float)
    return _percentile_interval(replicates, confidence)


@dataclass(frozen=True)
class Summary:
    count: int
    mean: float
    stddev: float
    min: float
    max: float
    p10: float
    p50: float
    ci_low: float
    ci_high: float
    pass_rate: float | None


def summarize(scores: ArrayLike, *, passed: Sequence[bool] | None = None, confidence: float = 0.95,
              resamples: int = 2000, seed: int = 0) -> Summary:
    """Count, mean, sample stddev (0 for one score), min/max/p10/p50 and the bootstrap CI of the mean;
    pass_rate is the share of `passed` (None when not given)."""
    array = _floats(scores, "scores")
    if array.size == 0:
        raise ValueError("cannot summarize no scores")
    if not np.isfinite(array).all():
        raise ValueError("scores must be finite")
    pass_rate = None
    if passed is not None:
        if len(passed) != array.size:
            raise ValueError(f"passed has {len(passed)} entries for {array.size} scores")
        pass_rate = float(np.mean(np.asarray(passed, dtype=bool)))
    low, high = bootstrap_ci(array, confidence=confidence, resamples=resamples, seed=seed)
    return Summary(count=int(array.size), mean=float(array.mean()),
                   stddev=float(array.std(ddof=1)) if array.size > 1 else 0.0,
                   min=float(array.min()), max=float(array.max()), p10=float(np.percentile(array, 10)),
                   p50=float(np.percentile(array, 50)), ci_low=low, ci_high=high, pass_rate=pass_rate)


@dataclass(frozen=True)
class Comparison:
    paired: int
    base_mean: float
    candidate_mean: float
    mean_delta: float
    """candidate - base (not flipped for lower-is-better metrics; wins are)."""
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int
    win_rate: float
    """(wins + ties / 2) / paired."""


def paired_comparison(base: ArrayLike, candidate: ArrayLike, *, lower_is_better: bool = False,
                      tie_margin: float = 1e-9, confidence: float = 0.95, resamples: int = 2000,
                      seed: int = 0) -> Comparison:
    """Compare two runs scored on the same examples (position i of both is one example): the mean of
    candidate - base with a paired bootstrap CI, and per-example wins/ties/losses of the candidate
    (a difference within `tie_margin` is a tie)."""
    b, c = _floats(base, "base"), _floats(candidate, "candidate")
    if b.size != c.size:
        raise ValueError(f"base has {b.size} scores, candidate {c.size}: a paired comparison needs equal counts")
    if b.size == 0:
        raise ValueError("no paired examples")
    delta = c - b
    improvement = -delta if lower_is_better else delta
    wins = int((improvement > tie_margin).sum())
    losses = int((improvement < -tie_margin).sum())
    ties = int(b.size) - wins - losses
    low, high = bootstrap_ci(delta, confidence=confidence, resamples=resamples, seed=seed)
    return Comparison(paired=int(b.size), base_mean=float(b.mean()), candidate_mean=float(c.mean()),
                      mean_delta=float(delta.mean()), ci_low=low, ci_high=high, wins=wins, ties=ties,
                      losses=losses, win_rate=(wins + ties / 2) / b.size)


ALPHA_LEVELS = ("nominal", "ordinal", "interval", "ratio")
PACKAGE_ALPHA_MAX_VALUES = 64
"""The krippendorff package's cost grows with units x distinct values squared (seconds for 200 units of
continuous scores); past this many distinct values interval alpha is computed in closed form instead."""


def _interval_alpha(matrix: FloatArray) -> float:
    """Interval alpha from sums of squares: within a unit, the squared differences of all ordered pairs
    sum to 2 m SS (m values, SS their squared deviations from the unit mean); likewise over all pairable
    values for the expected disagreement."""
    present = ~np.isnan(matrix)
    m = present.sum(axis=0)
    pairable = m >= 2
    if not pairable.any():
        return math.nan
    values = np.where(present, matrix, 0.0)[:, pairable]
    m_u = m[pairable].astype(float)
    means = values.sum(axis=0) / m_u
    within = (np.where(present[:, pairable], values - means, 0.0) ** 2).sum(axis=0)
    pooled = matrix[:, pairable][present[:, pairable]]
    n = pooled.size
    observed = float((2.0 * m_u * within / (m_u - 1.0)).sum() / n)
    expected = float(2.0 * ((pooled - pooled.mean()) ** 2).sum() / (n - 1))
    return 1.0 - observed / expected if expected > 0 else math.nan


def krippendorff_alpha(ratings: ArrayLike, *, level: str = "interval") -> float:
    """Krippendorff's alpha of a coders x units matrix of numeric ratings, NaN for missing; `level` is
    nominal, ordinal, interval or ratio. Returns NaN where alpha is undefined: no unit rated by two
    coders, or no variance at all among the pairable ratings (expected disagreement 0)."""
    if level not in ALPHA_LEVELS:
        raise ValueError(f"level must be one of {', '.join(ALPHA_LEVELS)}, got {level!r}")
    matrix = np.asarray(ratings, dtype=float)
    if matrix.ndim != 2:
        raise ValueError(f"ratings must be coders x units, got shape {matrix.shape}")
    if level == "interval" and np.unique(matrix[~np.isnan(matrix)]).size > PACKAGE_ALPHA_MAX_VALUES:
        return _interval_alpha(matrix)
    try:
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            value = float(krippendorff.alpha(reliability_data=matrix, level_of_measurement=level))  # type: ignore[arg-type]
    except (ValueError, ZeroDivisionError):  # the package raises when nothing is pairable
        return math.nan
    return value if math.isfinite(value) else math.nan


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float | np.floating) and math.isnan(value))


def flip_rate(verdicts: ArrayLike) -> float:
    """Share of units (rows) whose repeated verdicts (columns: booleans or labels, None/NaN missing) are
    not all equal. Units with fewer than two verdicts are ignored; none left: NaN."""
    matrix = np.asarray(verdicts, dtype=object)
    if matrix.ndim != 2:
        raise ValueError(f"verdicts must be units x repeats, got shape {matrix.shape}")
    counted = flipped = 0
    for row in matrix:
        present = [v.item() if isinstance(v, np.generic) else v for v in row if not _missing(v)]
        if len(present) < 2:
            continue
        counted += 1
        flipped += any(v != present[0] for v in present[1:])
    return flipped / counted if counted else math.nan


def _pairs(x: ArrayLike, y: ArrayLike) -> tuple[FloatArray, FloatArray]:
    a, b = _floats(x, "x"), _floats(y, "y")
    if a.size != b.size:
        raise ValueError(f"x has {a.size} values, y {b.size}")
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep], b[keep]


def _correlatable(a: FloatArray, b: FloatArray) -> bool:
    return a.size >= 2 and bool(np.ptp(a) > 0) and bool(np.ptp(b) > 0)


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman's rho over the pairs where neither is NaN; NaN for fewer than two pairs or a constant side."""
    a, b = _pairs(x, y)
    return float(sps.spearmanr(a, b).statistic) if _correlatable(a, b) else math.nan


def kendall_tau(x: ArrayLike, y: ArrayLike) -> float:
    """Kendall's tau-b over the pairs where neither is NaN; NaN for fewer than two pairs or a constant side."""
    a, b = _pairs(x, y)
    return float(sps.kendalltau(a, b).statistic) if _correlatable(a, b) else math.nan


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson's r over the pairs where neither is NaN; NaN for fewer than two pairs or a constant side."""
    a, b = _pairs(x, y)
    return float(sps.pearsonr(a, b).statistic) if _correlatable(a, b) else math.nan


CORRELATIONS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "spearman": spearman, "kendall": kendall_tau, "pearson": pearson}


def quadratic_kappa(a: ArrayLike, b: ArrayLike) -> float:
    """Cohen's kappa with quadratic weights of two integer ratings of the same units; NaN when undefined
    (no units, or both raters always give the same single rating)."""
    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("quadratic_kappa needs two one-dimensional ratings of equal length")
    labels = np.union1d(x, y)
    if x.size == 0 or labels.size < 2:
        return math.nan
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = float(skm.cohen_kappa_score(x, y, weights="quadratic", labels=labels))
    return value if math.isfinite(value) else math.nan


def mean_absolute_error(x: ArrayLike, y: ArrayLike) -> float:
    """Mean |x - y| over the pairs where neither is NaN; NaN when there are none."""
    a, b = _pairs(x, y)
    return float(np.abs(a - b).mean()) if a.size else math.nan


def grouped_correlation(metric: ArrayLike, human: ArrayLike, groups: Sequence[Hashable],
                        method: CorrelationMethod = "spearman") -> tuple[dict[Hashable, float], float]:
    """Correlation inside each group (e.g. the system outputs for one source document, as G-Eval
    reports SummEval), then the mean over the groups where it is defined. Returns (per group, mean);
    a group with under two pairs or a constant side is NaN and left out of the mean (none left: NaN)."""
    correlate = CORRELATIONS[method]
    a, b = _floats(metric, "metric"), _floats(human, "human")
    if not a.size == b.size == len(groups):
        raise ValueError(f"metric, human and groups differ in length ({a.size}, {b.size}, {len(groups)})")
    members: dict[Hashable, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    per_group = {group: correlate(a[rows], b[rows]) for group, rows in members.items()}
    defined = [v for v in per_group.values() if math.isfinite(v)]
    return per_group, float(np.mean(defined)) if defined else math.nan


def binary_metrics(scores: ArrayLike, labels: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Detection of positive labels by `score >= threshold`: accuracy, precision, recall, f1 (0 where a
    denominator is 0) and auroc of the raw scores (NaN when the labels hold one class only)."""
    s = _floats(scores, "scores")
    y = np.asarray(labels).astype(bool)
    if y.shape != s.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if s.size == 0:
        raise ValueError("no scores")
    predicted = s >= threshold
    auroc = float(skm.roc_auc_score(y, s)) if 0 < y.sum() < y.size else math.nan
    return {"accuracy": float(skm.accuracy_score(y, predicted)),
            "precision": float(skm.precision_score(y, predicted, zero_division=0)),
            "recall": float(skm.recall_score(y, predicted, zero_division=0)),
            "f1": float(skm.f1_score(y, predicted, zero_division=0)), "auroc": auroc}


def _finite_floats(values: ArrayLike, name: str) -> FloatArray:
    array = _floats(values, name)
    array = array[np.isfinite(array)]
    if array.size == 0:
        raise ValueError(f"{name} has no finite values")
    return array


def _bin_shares(values: FloatArray, edges: FloatArray) -> FloatArray:
    """Shares of `values` below edges[0], in each [edges[i], edges[i+1]) (the last bin closed) and above
    edges[-1]; a single edge (constant reference) makes the middle bin that exact value."""
    below, above = values < edges[0], values > edges[-1]
    inside = values[~below & ~above]
    inner = max(len(edges) - 1, 1)
    bins = np.clip(np.searchsorted(edges, inside, side="right") - 1, 0, inner - 1)
    counts = np.concatenate([[below.sum()], np.bincount(bins, minlength=inner), [above.sum()]])
    return counts.astype(float) / values.size


def psi(reference: ArrayLike, current: ArrayLike, *, bins: int = 10,
        edges: Literal["quantile", "unit"] = "quantile") -> float:
    """Population stability index of `current` against `reference`: sum of (c - r) * ln(c / r) over bins.
    edges="quantile": bin edges at the reference's quantiles (tied quantiles merged); "unit": `bins` equal
    bins on [0, 1] (scores). Values outside the edges fall in an extra bin at either end; bin shares are
    floored at PSI_EPSILON. NaNs are ignored."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    ref, cur = _finite_floats(reference, "reference"), _finite_floats(current, "current")
    if edges == "quantile":
        cuts = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)))
    elif edges == "unit":
        cuts = np.linspace(0.0, 1.0, bins + 1)
    else:
        raise ValueError(f"edges must be 'quantile' or 'unit', got {edges!r}")
    r = np.maximum(_bin_shares(ref, cuts), PSI_EPSILON)
    c = np.maximum(_bin_shares(cur, cuts), PSI_EPSILON)
    return float(np.sum((c - r) * np.log(c / r)))


def ks_2samp(reference: ArrayLike, current: ArrayLike) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test: (statistic, p-value). NaNs are ignored."""
    result = sps.ks_2samp(_finite_floats(reference, "reference"), _finite_floats(current, "current"))
    return float(result.statistic), float(result.pvalue)


def drift_severity(psi_value: float) -> str:
    """The usual PSI reading: "none" under 0.1, "moderate" under 0.25, "severe" from there (the words of DriftSeverity and the drift event)."""
    return "none" if psi_value < 0.1 else "moderate" if psi_value < 0.25 else "severe"


def distribution(values: ArrayLike, bins: int = 10) -> list[tuple[float, float, int]]:
    """Histogram for reports: (low edge, high edge, count) per equal-width bin over the finite values'
    range; [] for none."""
    array = _floats(values)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return []
    counts, cuts = np.histogram(array, bins=bins)
    return [(float(cuts[i]), float(cuts[i + 1]), int(counts[i])) for i in range(len(counts))]
