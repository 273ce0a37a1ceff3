"""Training and offline evaluation of the complexity router."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmo.embedding import Embedder
from llmo.router.learned.data import RoutingDataset, leave_subjects_out_split
from llmo.router.learned.features import FEATURE_NAMES, feature_matrix
from llmo.router.learned.metrics import RouterMetrics, router_metrics
from llmo.router.learned.model import (
    DEFAULT_HEAD_WEIGHT,
    DEFAULT_OPTION_WEIGHT,
    ComplexityRouter,
    blend,
    complexity_prior,
    design_matrix,
    fit_head,
    new_version,
    option_percentiles,
    option_similarities,
    percentile_grid,
)

DEFAULT_C = 0.01


@dataclass(frozen=True)
class TrainConfig:
    c: float = DEFAULT_C
    head_weight: float = DEFAULT_HEAD_WEIGHT
    option_weight: float = DEFAULT_OPTION_WEIGHT
    seed: int = 0


def _strong_wins(data: RoutingDataset) -> np.ndarray:
    return data.strong_correct & ~data.weak_correct


def train_router(
    data: RoutingDataset, embedder: Embedder, config: TrainConfig | None = None, version: str | None = None
) -> ComplexityRouter:
    cfg = config or TrainConfig()
    if len(data) < 10:
        raise ValueError(f"need at least 10 training prompts, got {len(data)}")
    if not (0.0 <= cfg.head_weight and 0.0 <= cfg.option_weight and cfg.head_weight + cfg.option_weight <= 1.0):
        raise ValueError("head_weight and option_weight must be >= 0 and sum to at most 1")
    wins = _strong_wins(data)
    if wins.all() or not wins.any():
        raise ValueError("training data needs prompts where the weak model fails and the strong model wins, and others")
    emb = embedder.encode(data.prompts)
    feats = feature_matrix(data.prompts)
    head = fit_head(design_matrix(emb, feats), wins, cfg.c, cfg.seed)
    head_out = head.predict(design_matrix(emb, feats))
    prior = complexity_prior(feats)
    head_grid, prior_grid = percentile_grid(head_out), percentile_grid(prior)
    option_grid = None
    option_pct = None
    option_weight = 0.0
    if cfg.option_weight > 0:
        sims = option_similarities(data.prompts, embedder.encode)
        if not np.isnan(sims).all():
            option_grid = percentile_grid(sims[~np.isnan(sims)])
            option_pct = option_percentiles(sims, option_grid)
            option_weight = cfg.option_weight
    scores = blend(head_out, prior, head_grid, prior_grid, cfg.head_weight, option_pct, option_weight)
    router = ComplexityRouter(
        version=version or new_version(),
        weak_model=data.weak_model,
        strong_model=data.strong_model,
        head=head,
        head_quantiles=head_grid,
        prior_quantiles=prior_grid,
        quantiles=np.percentile(scores, np.linspace(0, 100, 101)),
        head_weight=cfg.head_weight,
        option_quantiles=option_grid,
        option_weight=option_weight,
        metadata={
            "train_prompts": len(data),
            "train_subjects": sorted(set(data.subjects)),
            "c": cfg.c,
            "weak_accuracy": float(data.weak_correct.mean()),
            "strong_accuracy": float(data.strong_correct.mean()),
        },
    )
    return router


def score_prompts(router: ComplexityRouter, embedder: Embedder, prompts: list[str]) -> np.ndarray:
    return router.score_prompts(prompts, embedder.encode)


def evaluate_router(router: ComplexityRouter, embedder: Embedder, data: RoutingDataset) -> RouterMetrics:
    return router_metrics(score_prompts(router, embedder, data.prompts), data.weak_correct, data.strong_correct)


@dataclass(frozen=True)
class HoldoutReport:
    train_size: int
    test_size: int
    test_subjects: list[str]
    metrics: RouterMetrics
    random_apgr: float
    subject_oracle_apgr: float


def _apgr_of(scores: np.ndarray, data: RoutingDataset) -> float:
    """APGR of `scores` on `data`; tied scores (a subject's prompts, a binary feature) are
    broken in a fixed random order rather than by position in the file."""
    jitter = np.random.default_rng(0).random(len(data)) * 1e-9
    return router_metrics(scores.astype(np.float64) + jitter, data.weak_correct, data.strong_correct).apgr


def subject_oracle_apgr(data: RoutingDataset) -> float:
    """APGR of an oracle that knows each subject's exact mean gain (strong minus weak accuracy)
    on `data` and nothing about single prompts: the ceiling of subject-level difficulty alone."""
    gain = data.strong_correct.astype(np.float64) - data.weak_correct.astype(np.float64)
    subjects = np.array(data.subjects)
    by_subject = {name: float(gain[subjects == name].mean()) for name in set(data.subjects)}
    return _apgr_of(np.array([by_subject[name] for name in data.subjects]), data)


def holdout_evaluation(
    data: RoutingDataset, embedder: Embedder, test_fraction: float = 0.25, seed: int = 0, config: TrainConfig | None = None
) -> tuple[ComplexityRouter, HoldoutReport]:
    """Train on some subjects, report RouteLLM metrics on the held-out subjects."""
    train, test = leave_subjects_out_split(data, test_fraction, seed)
    router = train_router(train, embedder, config)
    metrics = evaluate_router(router, embedder, test)
    rng = np.random.default_rng(seed)
    random_apgr = float(
        np.mean(
            [
                router_metrics(rng.random(len(test)), test.weak_correct, test.strong_correct).apgr
                for _ in range(20)
            ]
        )
    )
    return router, HoldoutReport(
        len(train), len(test), sorted(set(test.subjects)), metrics, random_apgr, subject_oracle_apgr(test)
    )


def default_cache_dir() -> Path:
    return Path(".llmo") / "router" / "embeddings"


def signal_report(data: RoutingDataset) -> list[tuple[str, float]]:
    """APGR of each cheap text signal used as the routing score on all of `data` (higher value =
    send to the strong model; a signal below 0.5 works reversed), the complexity prior, and, with
    several subjects, the subject oracle. No training: a screen for signals worth learning from."""
    feats = feature_matrix(data.prompts)
    rows = [(name, _apgr_of(feats[:, j], data)) for j, name in enumerate(FEATURE_NAMES)]
    rows.append(("complexity prior", _apgr_of(complexity_prior(feats), data)))
    if len(set(data.subjects)) > 1:
        rows.append(("subject oracle", subject_oracle_apgr(data)))
    return rows

