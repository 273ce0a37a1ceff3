"""The ranking metrics of `llmo retrieval evaluate` (llmo.retrieval.evaluation), against values
computed by hand."""

from __future__ import annotations

import math

import pytest

from llmo.retrieval import evaluation as ev


def test_ndcg_linear_gains_cut_at_k() -> None:
    # one relevant document at rank 2: (1 / log2 3) / 1
    assert ev.ndcg_at_k(["a", "b", "c"], {"b": 1}, 10) == pytest.approx(1 / math.log2(3))
    # graded: DCG@2 = 0 + 2 / log2 3; ideal@2 = 2 / log2 2 + 1 / log2 3
    ideal = 2 + 1 / math.log2(3)
    assert ev.ndcg_at_k(["x", "a", "b"], {"a": 2, "b": 1}, 2) == pytest.approx((2 / math.log2(3)) / ideal)
    assert ev.ndcg_at_k(["a", "b"], {"a": 2, "b": 1}, 10) == pytest.approx(1.0)
    # past the cut-off counts nothing; grade 0 is not relevant
    assert ev.ndcg_at_k(["x", "y", "a"], {"a": 1, "x": 0}, 2) == 0.0
    assert ev.ndcg_at_k(["a"], {}, 10) == 0.0


def test_recall_and_mrr() -> None:
    judged = {"a": 1, "b": 1, "c": 1, "z": 0}
    assert ev.recall_at_k(["a", "x", "b"], judged, 2) == pytest.approx(1 / 3)
    assert ev.recall_at_k(["a", "x", "b"], judged, 3) == pytest.approx(2 / 3)
    assert ev.recall_at_k(["z"], judged, 10) == 0.0
    assert ev.mrr_at_k(["x", "y", "a"], judged, 10) == pytest.approx(1 / 3)
    assert ev.mrr_at_k(["x", "y", "a"], judged, 2) == 0.0
    assert ev.mrr_at_k(["b", "a"], judged, 1) == 1.0


def test_average_precision_over_every_relevant_document() -> None:
    # hits at ranks 1 and 3 of three relevant: (1/1 + 2/3) / 3
    assert ev.average_precision(["a", "x", "b"], {"a": 1, "b": 2, "c": 1}) == pytest.approx((1 + 2 / 3) / 3)
    assert ev.average_precision(["x"], {"a": 1}) == 0.0
    assert ev.average_precision(["a"], {}) == 0.0


def test_query_metrics_keys() -> None:
    metrics = ev.query_metrics(["a", "b"], {"b": 1}, 5)
    assert metrics == {"ndcg@5": pytest.approx(1 / math.log2(3)), "recall@5": 1.0, "mrr@5": 0.5, "map": 0.5}


def test_bootstrap_interval() -> None:
    constant = ev.bootstrap_ci([0.5] * 7)
    assert (constant.mean, constant.low, constant.high) == (0.5, 0.5, 0.5)
    values = [0.0, 1.0, 0.2, 0.9, 0.4, 0.7, 0.1, 0.6]
    first, again = ev.bootstrap_ci(values, seed=3), ev.bootstrap_ci(values, seed=3)
    assert first == again  # seeded: reproducible
    assert first.mean == pytest.approx(sum(values) / len(values))
    assert 0.0 <= first.low < first.mean < first.high <= 1.0
    # a larger sample of the same spread gives a narrower interval
    wide, narrow = ev.bootstrap_ci(values), ev.bootstrap_ci(values * 16)
    assert narrow.high - narrow.low < wide.high - wide.low
    with pytest.raises(ValueError):
        ev.bootstrap_ci([])


def test_summarise_and_percentile() -> None:
    per_query = [ev.query_metrics(["a"], {"a": 1}, 10), ev.query_metrics(["x"], {"a": 1}, 10)]
    summary = ev.summarise(per_query)
    assert set(summary) == {"ndcg@10", "recall@10", "mrr@10", "map"}
    assert summary["ndcg@10"].mean == 0.5
    assert summary["map"].as_dict()["mean"] == 0.5
    assert ev.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert ev.percentile([5.0], 99) == 5.0
