"""The learned complexity router: a versioned artifact that scores how much a prompt needs
the strong model, and a threshold calibrated to a target share of strong calls.

Features are MiniLM embeddings plus cheap text features (see `features.py`) and two
neighbourhood features: the weak model's failure rate and the strong model's win rate among
the k most similar training prompts. Two logistic-regression heads estimate
P(weak model fails) and P(strong model wins); the routing score is their mean.

Artifact layout (a directory)::

    router.json     version, models, metrics, calibration quantiles, feature names
    weights.npz     standardisation and head weights, training embeddings and labels for kNN
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmo.router.learned.embed import EMBEDDING_MODEL
from llmo.router.learned.features import FEATURE_NAMES

FORMAT = "llmo-router/complexity-v1"
KNN_K = 50


class ArtifactError(ValueError):
    """A router artifact directory is missing files or was written by an incompatible version."""


@dataclass
class LinearHead:
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = ((x - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))


def fit_head(x: np.ndarray, y: np.ndarray, c: float, seed: int = 0) -> LinearHead:
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-8] = 1.0
    model = LogisticRegression(C=c, max_iter=3000, random_state=seed)
    model.fit((x - mean) / scale, y.astype(int))
    return LinearHead(mean, scale, model.coef_[0].astype(np.float64), float(model.intercept_[0]))


def knn_features(
    query: np.ndarray, train: np.ndarray, labels: np.ndarray, k: int, exclude_self: bool = False
) -> np.ndarray:
    """Mean label of the k most similar training rows (cosine; embeddings are normalised)."""
    out = np.empty((len(query), labels.shape[1]), dtype=np.float64)
    k_eff = min(k, len(train) - (1 if exclude_self else 0))
    if k_eff <= 0:
        out[:] = labels.mean(axis=0) if len(labels) else 0.0
        return out
    for start in range(0, len(query), 1024):
        sims = query[start : start + 1024] @ train.T
        if exclude_self:
            rows = np.arange(sims.shape[0])
            sims[rows, start + rows] = -np.inf
        idx = np.argpartition(-sims, k_eff - 1, axis=1)[:, :k_eff]
        out[start : start + 1024] = labels[idx].mean(axis=1)
    return out


@dataclass
class ComplexityRouter:
    version: str
    weak_model: str
    strong_model: str
    fail_head: LinearHead
    win_head: LinearHead
    train_embeddings: np.ndarray
    train_labels: np.ndarray  # columns: weak failed, strong won
    quantiles: np.ndarray  # score quantiles on the training data, 0..100 %
    metadata: dict[str, Any] = field(default_factory=dict)
    knn_k: int = KNN_K

    def _design(self, embeddings: np.ndarray, text_feats: np.ndarray, exclude_self: bool = False) -> np.ndarray:
        knn = knn_features(embeddings, self.train_embeddings, self.train_labels, self.knn_k, exclude_self)
        return np.hstack([embeddings.astype(np.float64), text_feats.astype(np.float64), knn])

    def score_features(self, embeddings: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
        """Higher means the strong model is more likely to be needed, in [0, 1]."""
        x = self._design(embeddings, text_feats)
        return 0.5 * (self.fail_head.predict(x) + self.win_head.predict(x))

    def threshold_for_strong_share(self, share: float) -> float:
        """Score above which a request goes to the strong model so that about `share` of
        training-like traffic does."""
        if not 0.0 <= share <= 1.0:
            raise ValueError("strong share must be in [0, 1]")
        if share >= 1.0:
            return -np.inf
        if share <= 0.0:
            return np.inf
        return float(np.interp(100.0 * (1.0 - share), np.linspace(0, 100, len(self.quantiles)), self.quantiles))

    @staticmethod
    def strong_share_for_cost(target_micros: float, weak_micros: float, strong_micros: float) -> float:
        """Share of strong calls whose expected cost per request meets `target_micros`."""
        if strong_micros <= weak_micros:
            return 1.0
        return float(np.clip((target_micros - weak_micros) / (strong_micros - weak_micros), 0.0, 1.0))

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            directory / "weights.npz",
            fail_mean=self.fail_head.mean,
            fail_scale=self.fail_head.scale,
            fail_coef=self.fail_head.coef,
            fail_intercept=np.array([self.fail_head.intercept]),
            win_mean=self.win_head.mean,
            win_scale=self.win_head.scale,
            win_coef=self.win_head.coef,
            win_intercept=np.array([self.win_head.intercept]),
            train_embeddings=self.train_embeddings.astype(np.float16),
            train_labels=self.train_labels.astype(np.float32),
            quantiles=self.quantiles,
        )
        meta = {
            "format": FORMAT,
            "version": self.version,
            "weak_model": self.weak_model,
            "strong_model": self.strong_model,
            "embedding_model": EMBEDDING_MODEL,
            "text_features": list(FEATURE_NAMES),
            "knn_k": self.knn_k,
            **self.metadata,
        }
        (directory / "router.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: Path) -> ComplexityRouter:
        directory = Path(directory)
        meta_path, weights_path = directory / "router.json", directory / "weights.npz"
        if not meta_path.exists() or not weights_path.exists():
            raise ArtifactError(f"{directory}: not a router artifact (needs router.json and weights.npz)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ArtifactError(f"{directory}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("text_features") != list(FEATURE_NAMES):
            raise ArtifactError(f"{directory}: trained with different text features; retrain it")
        with np.load(weights_path) as w:

            def head(prefix: str) -> LinearHead:
                return LinearHead(
                    w[f"{prefix}_mean"], w[f"{prefix}_scale"], w[f"{prefix}_coef"], float(w[f"{prefix}_intercept"][0])
                )

            router = cls(
                version=str(meta["version"]),
                weak_model=str(meta["weak_model"]),
                strong_model=str(meta["strong_model"]),
                fail_head=head("fail"),
                win_head=head("win"),
                train_embeddings=w["train_embeddings"].astype(np.float32),
                train_labels=w["train_labels"].astype(np.float64),
                quantiles=w["quantiles"],
                metadata={k: v for k, v in meta.items() if k not in {"version", "weak_model", "strong_model"}},
                knn_k=int(meta.get("knn_k", KNN_K)),
            )
        return router


def new_version() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
