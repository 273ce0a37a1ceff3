"""Training and offline evaluation of the complexity router."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmo.router.learned.data import RoutingDataset, leave_subjects_out_split
from llmo.router.learned.embed import Embedder
from llmo.router.learned.features import feature_matrix
from llmo.router.learned.metrics import RouterMetrics, router_metrics
from llmo.router.learned.model import KNN_K, ComplexityRouter, fit_head, knn_features, new_version

DEFAULT_C = 0.05


@dataclass(frozen=True)
class TrainConfig:
    c: float = DEFAULT_C
    knn_k: int = KNN_K
    seed: int = 0


def _labels(data: RoutingDataset) -> np.ndarray:
    weak_failed = ~data.weak_correct
    strong_won = data.strong_correct & ~data.weak_correct
    return np.stack([weak_failed, strong_won], axis=1).astype(np.float64)


def train_router(
    data: RoutingDataset, embedder: Embedder, config: TrainConfig | None = None, version: str | None = None
) -> ComplexityRouter:
    cfg = config or TrainConfig()
    if len(data) < 10:
        raise ValueError(f"need at least 10 training prompts, got {len(data)}")
    labels = _labels(data)
    if labels[:, 0].min() == labels[:, 0].max() or labels[:, 1].min() == labels[:, 1].max():
        raise ValueError("training data needs prompts where the weak model fails and the strong model wins, and others")
    emb = embedder.encode(data.prompts)
    feats = feature_matrix(data.prompts)
    # kNN features on the training set leave each prompt out of its own neighbourhood.
    knn = knn_features(emb, emb, labels, cfg.knn_k, exclude_self=True)
    x = np.hstack([emb.astype(np.float64), feats.astype(np.float64), knn])
    fail_head = fit_head(x, labels[:, 0], cfg.c, cfg.seed)
    win_head = fit_head(x, labels[:, 1], cfg.c, cfg.seed)
    scores = 0.5 * (fail_head.predict(x) + win_head.predict(x))
    router = ComplexityRouter(
        version=version or new_version(),
        weak_model=data.weak_model,
        strong_model=data.strong_model,
        fail_head=fail_head,
        win_head=win_head,
        train_embeddings=emb,
        train_labels=labels,
        quantiles=np.percentile(scores, np.linspace(0, 100, 101)),
        knn_k=cfg.knn_k,
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
    return router.score_features(embedder.encode(prompts), feature_matrix(prompts))


def evaluate_router(router: ComplexityRouter, embedder: Embedder, data: RoutingDataset) -> RouterMetrics:
    return router_metrics(score_prompts(router, embedder, data.prompts), data.weak_correct, data.strong_correct)


@dataclass(frozen=True)
class HoldoutReport:
    train_size: int
    test_size: int
    test_subjects: list[str]
    metrics: RouterMetrics
    random_apgr: float


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
    return router, HoldoutReport(len(train), len(test), sorted(set(test.subjects)), metrics, random_apgr)


def default_cache_dir() -> Path:
    return Path(".llmo") / "router" / "embeddings"
