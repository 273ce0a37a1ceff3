"""`llmo eval meta`: agreement of a metric with human labels, overall, per group and for binary labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from llmo.evaluation import stats
from llmo.evaluation.cli import cli
from llmo.evaluation.meta import Row, _fast_binary, meta_evaluate


def test_correlations_follow_the_labels_overall_and_per_group() -> None:
    # Inside each document the metric ranks like the humans; across documents the levels differ.
    rows = [Row(score=g * 10 + s, human=s, group=f"doc{g}") for g in range(4) for s in range(5)]
    report = meta_evaluate(rows, resamples=100)
    assert report["spearman_per_group_mean"]["value"] == 1.0 and report["kendall_per_group_mean"]["value"] == 1.0
    assert report["spearman"]["value"] < 1.0  # the pooled ranking mixes documents
    reversed_rows = [Row(score=-r.score, human=r.human, group=r.group) for r in rows]
    assert meta_evaluate(reversed_rows, resamples=100)["spearman_per_group_mean"]["value"] == -1.0
    ci = report["spearman"]
    assert ci["ci_low"] <= ci["value"] <= ci["ci_high"]


def test_binary_labels_get_detection_figures(tmp_path: Path) -> None:
    data = tmp_path / "labels.jsonl"
    lines = [{"score": 0.9, "human": "yes"}, {"score": 0.8, "human": "yes"}, {"score": 0.7, "human": "no"},
             {"score": 0.2, "human": "no"}, {"score": 0.1, "human": "no"}, {"score": 0.6, "human": "yes"}]
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = CliRunner().invoke(cli, ["meta", "--data", str(data), "--json", "--resamples", "100"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    binary = report["binary"]
    assert binary["positives"] == 3 and binary["auroc"]["value"] == pytest.approx(1.0 - 1 / 9, abs=1e-4)
    assert binary["precision"]["value"] == 0.75 and binary["recall"]["value"] == 1.0
    table = CliRunner().invoke(cli, ["meta", "--data", str(data), "--resamples", "100"])
    assert table.exit_code == 0 and "auroc" in table.output


def test_bad_rows_name_the_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "bad.csv"
    data.write_text("score,human\n0.5,1\nhigh,0\n")
    result = CliRunner().invoke(cli, ["meta", "--data", str(data)])
    assert result.exit_code == 2 and "line 3" in result.output and "score" in result.output


@pytest.mark.parametrize("seed", range(5))
def test_bootstrap_binary_figures_are_the_sklearn_ones(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.uniform(size=40) < 0.4
    scores = np.round(np.clip(labels * 0.3 + rng.uniform(size=40), 0, 1), 1)  # ties included
    fast, reference = _fast_binary(scores, labels, 0.6), stats.binary_metrics(scores, labels, 0.6)
    assert fast == pytest.approx(reference)
