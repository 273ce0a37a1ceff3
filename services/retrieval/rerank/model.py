"""The learned reranker: LambdaRank (LightGBM) over the features of `features.py`, as a versioned
artifact.

Artifact layout (a directory)::

    reranker.json   format, version, feature names, LightGBM parameters, training summary
    model.txt       the LightGBM text model

Training is deterministic (fixed seed, `deterministic=True`, one thread, row-wise histograms), so
the same training data gives the same bytes; the version is derived from the model's bytes
unless one is given.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmo.retrieval.rerank.features import FEATURE_NAMES, RerankInput, feature_matrix

FORMAT = "llmo-retrieval/reranker-lambdarank-v1"
META_FILE, MODEL_FILE = "reranker.json", "model.txt"

PARAMS: dict[str, Any] = {
    "objective": "lambdarank",
    "metric": "ndcg",
    "eval_at": [10],
    "lambdarank_truncation_level": 20,
    "learning_rate": 0.05,
    "num_leaves": 15,
    "min_data_in_leaf": 50,
    "feature_fraction": 1.0,
    "bagging_fraction": 1.0,
    "lambda_l2": 1.0,
    "seed": 0,
    "deterministic": True,
    "force_row_wise": True,
    "num_threads": 1,
    "verbosity": -1,
}
ROUNDS = 200


class ArtifactError(ValueError):
    """A reranker artifact directory is missing files or was written for other features."""


@dataclass
class TrainingSet:
    """Feature rows grouped by query (consecutive rows of one query), with graded relevance labels."""

    features: np.ndarray
    labels: np.ndarray
    groups: list[int]
    sources: list[str] = field(default_factory=list)

    @classmethod
    def concat(cls, parts: list[TrainingSet]) -> TrainingSet:
        width = len(FEATURE_NAMES)
        return cls(np.vstack([p.features for p in parts]) if parts else np.zeros((0, width)),
                   np.concatenate([p.labels for p in parts]) if parts else np.zeros(0),
                   [g for p in parts for g in p.groups], [s for p in parts for s in p.sources])

    @property
    def queries(self) -> int:
        return len(self.groups)


@dataclass
class LearnedReranker:
    """Scores candidates with the LightGBM ranker; implements `llmo.retrieval.rerank.Reranker`."""

    version: str
    booster: Any  # lightgbm.Booster
    metadata: dict[str, Any] = field(default_factory=dict)

    def score(self, batch: RerankInput) -> list[float]:
        if not batch.candidates:
            return []
        return [float(s) for s in self.predict(feature_matrix(batch))]

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(self.booster.predict(features, num_threads=1), dtype=np.float64)

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MODEL_FILE).write_text(model_text(self.booster))
        meta = {**self.metadata, "format": FORMAT, "version": self.version, "features": list(FEATURE_NAMES)}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: Path) -> LearnedReranker:
        import lightgbm

        directory = Path(directory)
        meta_path, model_path = directory / META_FILE, directory / MODEL_FILE
        if not meta_path.is_file() or not model_path.is_file():
            raise ArtifactError(f"{directory}: not a reranker artifact (needs {META_FILE} and {MODEL_FILE})")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as error:
            raise ArtifactError(f"{directory}: {META_FILE} is unreadable: {error}") from error
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ArtifactError(f"{directory}: format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                                f"expected {FORMAT!r}")
        if meta.get("features") != list(FEATURE_NAMES):
            raise ArtifactError(f"{directory}: trained on other features; retrain it")
        try:
            booster = lightgbm.Booster(model_str=model_path.read_text())
        except (OSError, lightgbm.basic.LightGBMError) as error:
            raise ArtifactError(f"{directory}: {MODEL_FILE} is not a LightGBM model: {error}") from error
        if booster.num_feature() != len(FEATURE_NAMES):
            raise ArtifactError(f"{directory}: the model reads {booster.num_feature()} features, "
                                f"expected {len(FEATURE_NAMES)}")
        return cls(str(meta["version"]), booster, {k: v for k, v in meta.items() if k != "version"})


def model_text(booster: Any) -> str:
    return str(booster.model_to_string(num_iteration=-1))


def fit(data: TrainingSet, *, rounds: int = ROUNDS, version: str | None = None,
        summary: dict[str, Any] | None = None) -> LearnedReranker:
    """A LambdaRank model on `data` (deterministic). Queries without a relevant candidate carry no
    ranking signal and are left out."""
    import lightgbm

    keep_rows, keep_groups, start = [], [], 0
    for size in data.groups:
        if data.labels[start:start + size].max(initial=0) > 0:
            keep_rows.append(np.arange(start, start + size))
            keep_groups.append(size)
        start += size
    if not keep_groups:
        raise ValueError("no query has a relevant candidate: nothing to learn from")
    rows = np.concatenate(keep_rows)
    dataset = lightgbm.Dataset(data.features[rows], label=data.labels[rows], group=keep_groups,
                               feature_name=list(FEATURE_NAMES), params={"verbosity": -1}, free_raw_data=False)
    booster = lightgbm.train(PARAMS, dataset, num_boost_round=rounds)
    text = model_text(booster)
    version = version or "lambdarank-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    meta = {"lightgbm": lightgbm.__version__, "params": PARAMS, "rounds": rounds,
            "training": {**(summary or {}), "queries": data.queries, "queries_with_relevant": len(keep_groups),
                         "rows": int(rows.size)}}
    return LearnedReranker(version, lightgbm.Booster(model_str=text), meta)
