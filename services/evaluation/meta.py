"""Meta-evaluation: how well a metric agrees with human labels on a labelled file (`llmo eval meta`).

Each row holds a metric score and a human label (and optionally a group, e.g. the source document
of a summary). Reported: Spearman and Kendall's tau-b over all rows, and, when rows have groups,
per group and averaged over groups (as G-Eval's paper does for SummEval); for binary human labels
(0/1, true/false, yes/no) accuracy, precision, recall and F1 at a threshold, and AUROC. Every
figure carries a 95% percentile-bootstrap CI: rows are resampled, or whole groups for the grouped
correlations.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from llmo.evaluation import stats

BINARY = {"1": 1.0, "0": 0.0, "true": 1.0, "false": 0.0, "yes": 1.0, "no": 0.0}


class MetaInputError(ValueError):
    """A bad file or row; the message names the file and line."""


@dataclass(frozen=True)
class Row:
    score: float
    human: float
    group: str = ""


def _number(value: Any, where: str, field: str, *, binary_words: bool = False) -> float:
    if isinstance(value, bool):
        return float(value)
    if binary_words and isinstance(value, str) and value.strip().lower() in BINARY:
        return BINARY[value.strip().lower()]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MetaInputError(f"{where}: `{field}` must be a number, got {str(value)[:40]!r}") from None
    if not math.isfinite(number):
        raise MetaInputError(f"{where}: `{field}` must be finite")
    return number


def load_rows(path: Path, *, score_field: str = "score", human_field: str = "human",
              group_field: str = "group") -> list[Row]:
    try:
        if path.suffix.lower() == ".csv":
            with path.open(encoding="utf-8-sig", newline="") as handle:
                raw: list[tuple[int, Any]] = [(n, r) for n, r in enumerate(csv.DictReader(handle), start=2)]
        else:
            with path.open(encoding="utf-8") as handle:
                raw = []
                for n, line in enumerate(handle, start=1):
                    if line.strip():
                        try:
                            raw.append((n, json.loads(line)))
                        except json.JSONDecodeError as error:
                            raise MetaInputError(f"{path} line {n}: not JSON ({error.msg})") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise MetaInputError(f"{path}: {error}") from error
    rows = []
    for n, item in raw:
        where = f"{path} line {n}"
        if not isinstance(item, dict):
            raise MetaInputError(f"{where}: expected an object")
        for field in (score_field, human_field):
            if item.get(field) in (None, ""):
                raise MetaInputError(f"{where}: `{field}` is missing")
        rows.append(Row(_number(item[score_field], where, score_field),
                        _number(item[human_field], where, human_field, binary_words=True),
                        str(item.get(group_field) or "")))
    if len(rows) < 2:
        raise MetaInputError(f"{path}: at least two labelled rows are needed")
    return rows


def _with_ci(value: float, ci: tuple[float, float]) -> dict[str, float | None]:
    def clean(x: float) -> float | None:
        return round(x, 4) if math.isfinite(x) else None

    return {"value": clean(value), "ci_low": clean(ci[0]), "ci_high": clean(ci[1])}


def meta_evaluate(rows: Sequence[Row], *, threshold: float = 0.5, resamples: int = 1000, seed: int = 0
                  ) -> dict[str, Any]:
    scores = np.array([r.score for r in rows])
    humans = np.array([r.human for r in rows])
    report: dict[str, Any] = {"rows": len(rows)}
    for name, correlate in (("spearman", stats.spearman), ("kendall", stats.kendall_tau)):
        ci = stats.resample_ci(len(rows), lambda idx, f=correlate: f(scores[idx], humans[idx]),  # type: ignore[misc]
                               resamples=resamples, seed=seed)
        report[name] = _with_ci(correlate(scores, humans), ci)
    groups = [r.group for r in rows]
    if any(groups):
        report["groups"] = len(set(groups))
        for name, method in (("spearman", "spearman"), ("kendall", "kendall")):
            per_group, mean = stats.grouped_correlation(scores, humans, groups, method)  # type: ignore[arg-type]
            # A group's correlation does not change when the group is drawn, so resampling groups is
            # resampling these values (a group drawn twice counts twice; undefined ones stay out).
            values = np.array(list(per_group.values()))
            ci = stats.resample_ci(len(values), lambda idx, v=values: _defined_mean(v[idx]),  # type: ignore[misc]
                                   resamples=resamples, seed=seed)
            report[f"{name}_per_group_mean"] = _with_ci(mean, ci)
    if set(np.unique(humans)) <= {0.0, 1.0}:
        labels = humans.astype(bool)
        point = stats.binary_metrics(scores, labels, threshold)
        binary: dict[str, Any] = {"threshold": threshold, "positives": int(labels.sum())}
        for key in ("accuracy", "precision", "recall", "f1", "auroc"):
            ci = stats.resample_ci(len(rows), lambda idx, k=key: _fast_binary(scores[idx], labels[idx], threshold)[k],  # type: ignore[misc]
                                   resamples=resamples, seed=seed)
            binary[key] = _with_ci(point[key], ci)
        report["binary"] = binary
    return report


def _defined_mean(values: np.ndarray) -> float:
    defined = values[np.isfinite(values)]
    return float(defined.mean()) if defined.size else math.nan


def _fast_binary(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """stats.binary_metrics in plain numpy for the bootstrap replicates (sklearn's input checks cost
    ~1 ms a call, i.e. tens of seconds over 1000 resamples x 5 figures); AUROC as the Mann-Whitney U
    over mid-ranks, which is what roc_auc_score computes."""
    predicted = scores >= threshold
    tp = float(np.sum(predicted & labels))
    fp = float(np.sum(predicted & ~labels))
    fn = float(np.sum(~predicted & labels))
    positives, negatives = int(labels.sum()), int((~labels).sum())
    auroc = math.nan
    if positives and negatives:
        ranks = rankdata(scores)
        auroc = (float(ranks[labels].sum()) - positives * (positives + 1) / 2) / (positives * negatives)
    return {"accuracy": float(np.mean(predicted == labels)), "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0, "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
            "auroc": auroc}
