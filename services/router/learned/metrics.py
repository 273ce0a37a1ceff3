"""RouteLLM's router metrics.

A router scores each prompt; routing the top-scored fraction `c` of prompts to the strong
model gives accuracy `acc(c)`. With `w` and `s` the all-weak and all-strong accuracies:

- PGR(c) = (acc(c) - w) / (s - w), the performance gap recovered;
- APGR = the area under PGR(c) for c from 0 to 1 (random routing scores 0.5);
- CPT(x) = the smallest share of strong calls with PGR >= x (call-performance threshold).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RouterMetrics:
    apgr: float
    cpt50: float
    cpt80: float
    weak_accuracy: float
    strong_accuracy: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "apgr": round(self.apgr, 4),
            "cpt50": round(self.cpt50, 4),
            "cpt80": round(self.cpt80, 4),
            "weak_accuracy": round(self.weak_accuracy, 4),
            "strong_accuracy": round(self.strong_accuracy, 4),
            "n": self.n,
        }


def pgr_curve(scores: np.ndarray, weak_correct: np.ndarray, strong_correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(share of strong calls, PGR) for every cut 0..n of prompts sorted by descending score."""
    n = len(scores)
    if n == 0:
        raise ValueError("no prompts to evaluate")
    w = weak_correct.astype(np.float64)
    s = strong_correct.astype(np.float64)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    gain = np.concatenate([[0.0], np.cumsum(s[order] - w[order])])
    acc = (w.sum() + gain) / n
    weak_acc, strong_acc = w.mean(), s.mean()
    gap = strong_acc - weak_acc
    if gap <= 0:
        raise ValueError("the strong model is not more accurate than the weak one on this data; PGR is undefined")
    return np.arange(n + 1) / n, (acc - weak_acc) / gap


def router_metrics(scores: np.ndarray, weak_correct: np.ndarray, strong_correct: np.ndarray) -> RouterMetrics:
    share, pgr = pgr_curve(scores, weak_correct, strong_correct)
    apgr = float(np.sum((pgr[1:] + pgr[:-1]) / 2 * np.diff(share)))
    return RouterMetrics(
        apgr=apgr,
        cpt50=_cpt(share, pgr, 0.5),
        cpt80=_cpt(share, pgr, 0.8),
        weak_accuracy=float(weak_correct.mean()),
        strong_accuracy=float(strong_correct.mean()),
        n=len(scores),
    )


def _cpt(share: np.ndarray, pgr: np.ndarray, target: float) -> float:
    hit = np.flatnonzero(pgr >= target - 1e-12)
    return float(share[hit[0]]) if len(hit) else 1.0
