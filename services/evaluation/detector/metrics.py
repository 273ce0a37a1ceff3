"""The detector's scores on labelled pairs: binary (SUPPORTED vs not) precision, recall and F1 from
the predicted label, three-way macro-F1, and AUROC of P(SUPPORTED) for the binary task."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from llmo.evaluation.detector.data import LABELS, SUPPORTED


@dataclass(frozen=True)
class Scores:
    pairs: int
    binary_precision: float
    binary_recall: float
    binary_f1: float
    macro_f1: float
    f1_per_label: dict[str, float]
    auroc: float | None  # None when the gold labels are all one side

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def auroc(positive: Sequence[bool], score: Sequence[float]) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    y = np.asarray(positive, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    start = 0
    while start < len(s):  # average ranks over ties
        end = start
        while end + 1 < len(s) and sorted_s[end + 1] == sorted_s[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def score(gold: Sequence[str], predicted: Sequence[str], p_supported: Sequence[float]) -> Scores:
    """`gold` and `predicted` are our labels (SUPPORTED, CONTRADICTED, NOT_ENOUGH_INFO)."""
    if len(gold) != len(predicted) or len(gold) != len(p_supported):
        raise ValueError("gold, predicted and p_supported differ in length")
    per_label = {}
    for label in [lab for lab in LABELS if lab in gold or lab in predicted]:  # as scikit-learn averages
        tp = sum(g == label and p == label for g, p in zip(gold, predicted, strict=True))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted, strict=True))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted, strict=True))
        per_label[label] = _f1(tp, fp, fn)[2]
    tp = sum(g == SUPPORTED and p == SUPPORTED for g, p in zip(gold, predicted, strict=True))
    fp = sum(g != SUPPORTED and p == SUPPORTED for g, p in zip(gold, predicted, strict=True))
    fn = sum(g == SUPPORTED and p != SUPPORTED for g, p in zip(gold, predicted, strict=True))
    precision, recall, f1 = _f1(tp, fp, fn)
    return Scores(len(gold), precision, recall, f1, float(np.mean(list(per_label.values()))) if per_label else 0.0, per_label,
                  auroc([g == SUPPORTED for g in gold], p_supported))
