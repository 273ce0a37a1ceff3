"""The learned complexity router: a versioned artifact that scores how much a prompt needs
the strong model, and a threshold calibrated to a target share of strong calls.

The score blends two parts, each turned into a percentile of its training distribution so
they share one scale:

- a logistic-regression head on MiniLM embeddings plus cheap text features (see
  `features.py`) estimating P(strong model right and weak model wrong);
- a complexity prior from the text alone: log word count minus 3 x type-token ratio (long,
  repetitive prompts are harder);
- for multiple-choice prompts, the mean MiniLM cosine similarity between the answer options
  (close distractors make a question harder); prompts without options get the neutral 0.5.

On leave-subjects-out splits of RouteLLM's MMLU data the learned head alone transfers poorly
to unseen subjects (APGR about 0.53) while the two text signals transfer best; the blend
keeps all three (`head_weight` and `option_weight`, default 0.25 each, the prior the rest).

Artifact layout (a directory)::

    router.json     format, version, models, head weight, feature names, training summary
    weights.npz     standardisation and head weights, component and score quantiles
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmo.embedding import EMBEDDING_MODEL
from llmo.router.learned.features import FEATURE_NAMES, feature_matrix, option_texts

FORMAT = "llmo-router/complexity-v1"
DEFAULT_HEAD_WEIGHT = 0.25
DEFAULT_OPTION_WEIGHT = 0.25
PRIOR_TTR_WEIGHT = 3.0
_GRID = np.linspace(0, 100, 201)


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


@dataclass
class ComplexityRouter:
    version: str
    weak_model: str
    strong_model: str
    head: LinearHead
    head_quantiles: np.ndarray  # head outputs on the training data at _GRID percentiles
    prior_quantiles: np.ndarray  # complexity prior on the training data at _GRID percentiles
    quantiles: np.ndarray  # final scores on the training data at 0..100 % (threshold calibration)
    head_weight: float = DEFAULT_HEAD_WEIGHT
    metadata: dict[str, Any] = field(default_factory=dict)
    option_quantiles: np.ndarray | None = None  # option similarity on the training data
    option_weight: float = 0.0

    def components(self, embeddings: np.ndarray, text_feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = design_matrix(embeddings, text_feats)
        return self.head.predict(x), complexity_prior(text_feats)

    def score_features(
        self, embeddings: np.ndarray, text_feats: np.ndarray, option_sims: np.ndarray | None = None
    ) -> np.ndarray:
        """Higher means the strong model is more likely to be needed, in [0, 1]."""
        head, prior = self.components(embeddings, text_feats)
        options = None
        if self.option_quantiles is not None and self.option_weight > 0 and option_sims is not None:
            options = option_percentiles(option_sims, self.option_quantiles)
        return blend(head, prior, self.head_quantiles, self.prior_quantiles, self.head_weight, options, self.option_weight)

    def score_prompts(self, prompts: list[str], encode: Any) -> np.ndarray:
        """Scores for raw prompts; `encode` maps texts to normalised MiniLM embeddings."""
        sims = option_similarities(prompts, encode) if self.option_weight > 0 else None
        return self.score_features(encode(prompts), feature_matrix(prompts), sims)

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
        arrays: dict[str, np.ndarray] = {
            "head_mean": self.head.mean,
            "head_scale": self.head.scale,
            "head_coef": self.head.coef,
            "head_intercept": np.array([self.head.intercept]),
            "head_quantiles": self.head_quantiles,
            "prior_quantiles": self.prior_quantiles,
            "quantiles": self.quantiles,
        }
        if self.option_quantiles is not None:
            arrays["option_quantiles"] = self.option_quantiles
        np.savez_compressed(directory / "weights.npz", **arrays)  # type: ignore[arg-type]
        meta = {
            "format": FORMAT,
            "version": self.version,
            "weak_model": self.weak_model,
            "strong_model": self.strong_model,
            "embedding_model": EMBEDDING_MODEL,
            "text_features": list(FEATURE_NAMES),
            "head_weight": self.head_weight,
            "option_weight": self.option_weight,
            "prior_ttr_weight": PRIOR_TTR_WEIGHT,
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

            router = cls(
                version=str(meta["version"]),
                weak_model=str(meta["weak_model"]),
                strong_model=str(meta["strong_model"]),
                head=LinearHead(w["head_mean"], w["head_scale"], w["head_coef"], float(w["head_intercept"][0])),
                head_quantiles=w["head_quantiles"],
                prior_quantiles=w["prior_quantiles"],
                quantiles=w["quantiles"],
                head_weight=float(meta.get("head_weight", DEFAULT_HEAD_WEIGHT)),
                metadata={k: v for k, v in meta.items() if k not in {"version", "weak_model", "strong_model"}},
                option_quantiles=w["option_quantiles"] if "option_quantiles" in w.files else None,
                option_weight=float(meta.get("option_weight", 0.0)) if "option_quantiles" in w.files else 0.0,
            )
        return router


def design_matrix(embeddings: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
    return np.hstack([embeddings.astype(np.float64), text_feats.astype(np.float64)])


def complexity_prior(text_feats: np.ndarray) -> np.ndarray:
    words = text_feats[:, FEATURE_NAMES.index("log_words")].astype(np.float64)
    ttr = text_feats[:, FEATURE_NAMES.index("type_token_ratio")].astype(np.float64)
    return words - PRIOR_TTR_WEIGHT * ttr


def percentile_grid(values: np.ndarray) -> np.ndarray:
    return np.percentile(values, _GRID)


def to_percentile(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Empirical CDF of `values` against a training distribution summarised by `grid`, in [0, 1]."""
    # Ties in the grid (e.g. many equal values) map to the middle of their run.
    lo = np.searchsorted(grid, values, side="left")
    hi = np.searchsorted(grid, values, side="right")
    return np.clip((lo + hi) / 2 / (len(grid) - 1), 0.0, 1.0)


def blend(
    head: np.ndarray,
    prior: np.ndarray,
    head_grid: np.ndarray,
    prior_grid: np.ndarray,
    head_weight: float,
    option_pct: np.ndarray | None = None,
    option_weight: float = 0.0,
) -> np.ndarray:
    score = head_weight * to_percentile(head, head_grid)
    if option_pct is not None and option_weight > 0:
        score = score + option_weight * option_pct
    else:
        option_weight = 0.0
    return score + (1.0 - head_weight - option_weight) * to_percentile(prior, prior_grid)


def option_similarities(prompts: list[str], encode: Any) -> np.ndarray:
    """Mean pairwise cosine similarity of each prompt's answer options; NaN without options."""
    per_prompt = [option_texts(p) for p in prompts]
    unique = sorted({o for opts in per_prompt for o in opts})
    out = np.full(len(prompts), np.nan)
    if not unique:
        return out
    vectors = dict(zip(unique, encode(unique), strict=True))
    for i, opts in enumerate(per_prompt):
        if len(opts) < 2:
            continue
        m = np.stack([vectors[o] for o in opts])
        sims = m @ m.T
        iu = np.triu_indices(len(opts), 1)
        out[i] = float(sims[iu].mean())
    return out


def option_percentiles(sims: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Percentiles against the training grid; prompts without options are neutral (0.5)."""
    pct = to_percentile(np.nan_to_num(sims, nan=0.0), grid)
    return np.where(np.isnan(sims), 0.5, pct)


def new_version() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
