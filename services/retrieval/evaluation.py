"""Ranking metrics for `llmo retrieval evaluate`: pure functions over a ranking (document ids, best
first) and the judgements of one query (document id -> grade; grade > 0 is relevant).

Definitions follow trec_eval (as BEIR reports them): nDCG with linear gains (grade / log2(rank + 1))
normalised by the ideal ordering of the judged documents cut at k; recall@k over every relevant
document of the query; MRR@k the reciprocal rank of the first relevant document within k (0 when
none); average precision over the whole ranking given, divided by the number of relevant documents.
A query with no relevant document scores 0 on every metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Ranking = Sequence[str]
Judgements = Mapping[str, int]


def _relevant(judged: Judgements) -> set[str]:
    return {doc for doc, grade in judged.items() if grade > 0}


def dcg(gains: Sequence[float]) -> float:
    return sum(gain / math.log2(rank + 2) for rank, gain in enumerate(gains))


def ndcg_at_k(ranking: Ranking, judged: Judgements, k: int) -> float:
    ideal = dcg(sorted((g for g in judged.values() if g > 0), reverse=True)[:k])
    if ideal == 0:
        return 0.0
    return dcg([max(judged.get(doc, 0), 0) for doc in ranking[:k]]) / ideal


def recall_at_k(ranking: Ranking, judged: Judgements, k: int) -> float:
    relevant = _relevant(judged)
    if not relevant:
        return 0.0
    return len(relevant & set(ranking[:k])) / len(relevant)


def mrr_at_k(ranking: Ranking, judged: Judgements, k: int) -> float:
    relevant = _relevant(judged)
    for rank, doc in enumerate(ranking[:k], start=1):
        if doc in relevant:
            return 1.0 / rank
    return 0.0


def average_precision(ranking: Ranking, judged: Judgements) -> float:
    relevant = _relevant(judged)
    if not relevant:
        return 0.0
    hits, total = 0, 0.0
    for rank, doc in enumerate(ranking, start=1):
        if doc in relevant:
            hits += 1
            total += hits / rank
    return total / len(relevant)


def query_metrics(ranking: Ranking, judged: Judgements, k: int, depth: int | None = None) -> dict[str, float]:
    """Every metric of one query, keyed as reported: nDCG and MRR at `k`, recall at `depth`
    (default `k`), MAP over the whole ranking (`ndcg@10`, `recall@100`, `mrr@10`, `map`)."""
    depth = k if depth is None else depth
    return {
        f"ndcg@{k}": ndcg_at_k(ranking, judged, k),
        f"recall@{depth}": recall_at_k(ranking, judged, depth),
        f"mrr@{k}": mrr_at_k(ranking, judged, k),
        "map": average_precision(ranking, judged),
    }


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"mean": round(self.mean, 6), "ci95_low": round(self.low, 6), "ci95_high": round(self.high, 6)}


def bootstrap_ci(values: Sequence[float], *, resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> Estimate:
    """The mean of per-query values with a percentile bootstrap interval (queries resampled with
    replacement, `resamples` times, from a fixed seed so a run is reproducible)."""
    if not values:
        raise ValueError("no values to estimate from")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError("resamples must be >= 1 and confidence in (0, 1)")
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Estimate(float(data.mean()), float(low), float(high))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100, linear interpolation between closest ranks)."""
    if not values:
        raise ValueError("no values")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarise(per_query: Sequence[Mapping[str, float]], *, resamples: int = 1000,
              seed: int = 0) -> dict[str, Estimate]:
    """Mean and bootstrap 95% interval of each metric over the queries (same keys as `query_metrics`)."""
    if not per_query:
        raise ValueError("no queries")
    return {name: bootstrap_ci([q[name] for q in per_query], resamples=resamples, seed=seed)
            for name in per_query[0]}
