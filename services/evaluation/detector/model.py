"""The detector's two linear models and their versioned artifact.

1. **Sentence model**: standardised `FEATURE_NAMES` of one (claim, sentence) pair -> multinomial
   logistic regression -> P(SUPPORTED), P(CONTRADICTED), P(NOT_ENOUGH_INFO) for that sentence.
2. **Context model**: `CONTEXT_FEATURE_NAMES`, summaries of the sentence probabilities over the
   whole context -> multinomial logistic regression -> the verdict's probabilities.

Artifact layout (a directory)::

    detector.json         format, version, labels, feature names, training summary, weights SHA-256
    weights.safetensors   float64 tensors: {sentence,context}.{mean,scale,coef,intercept}

The version is `fd-` + the first 12 hex digits of the SHA-256 of `weights.safetensors`; loading
checks the file against it, so an edited or truncated artifact is refused with `ArtifactError`.
Fitting is deterministic (lbfgs, no sampling): the same features give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmo.evaluation.detector.data import LABELS
from llmo.evaluation.detector.features import FEATURE_NAMES

FORMAT = "llmo-evaluation/faithfulness-detector-v1"
META_FILE, WEIGHTS_FILE = "detector.json", "weights.safetensors"
CONTEXT_FEATURE_NAMES: tuple[str, ...] = (
    "max_supported", "max_contradicted", "best_supported", "best_contradicted", "top2_evidence",
    "max_cosine", "max_claim_recall", "sentences_log",
)
SENTENCE_C = 1.0  # inverse L2 strength of the sentence model
CONTEXT_C = 1.0


class ArtifactError(ValueError):
    """A detector artifact directory is missing files, corrupt, or written for other features."""


@dataclass
class LinearSoftmax:
    """Standardisation then a multinomial logistic regression (numpy only at inference)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # (classes, features)
    intercept: np.ndarray  # (classes,)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        logits = ((features - self.mean) / self.scale) @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return np.asarray(exp / exp.sum(axis=1, keepdims=True), dtype=np.float64)

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{name}": np.ascontiguousarray(getattr(self, name), dtype=np.float64)
                for name in ("mean", "scale", "coef", "intercept")}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], prefix: str, width: int) -> LinearSoftmax:
        try:
            model = cls(*(np.asarray(tensors[f"{prefix}.{n}"], dtype=np.float64)
                          for n in ("mean", "scale", "coef", "intercept")))
        except KeyError as error:
            raise ArtifactError(f"{WEIGHTS_FILE} lacks the tensor {error.args[0]}") from error
        shapes_ok = (model.mean.shape == (width,) and model.scale.shape == (width,)
                     and model.coef.shape == (len(LABELS), width) and model.intercept.shape == (len(LABELS),))
        if not shapes_ok or not all(np.isfinite(t).all() for t in (model.mean, model.scale, model.coef, model.intercept)):
            raise ArtifactError(f"{WEIGHTS_FILE}: the {prefix} model's tensors have the wrong shape or are not finite")
        return model


def fit_linear(features: np.ndarray, labels: np.ndarray, c: float) -> LinearSoftmax:
    """A deterministic fit (classes 0..2 must all occur)."""
    from sklearn.linear_model import LogisticRegression

    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale[scale < 1e-12] = 1.0
    model = LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit((features - mean) / scale, labels)
    if list(model.classes_) != list(range(len(LABELS))):
        raise ValueError(f"training data lacks a label: saw classes {list(model.classes_)}")
    return LinearSoftmax(mean, scale, np.asarray(model.coef_), np.asarray(model.intercept_))


def context_features(probabilities: np.ndarray, sentence_features: np.ndarray) -> np.ndarray:
    """`CONTEXT_FEATURE_NAMES` of one context from its sentences' probabilities and features."""
    if len(probabilities) == 0:
        return np.zeros(len(CONTEXT_FEATURE_NAMES))
    evidence = 1.0 - probabilities[:, 2]
    best = int(np.argmax(evidence))
    return np.array([
        probabilities[:, 0].max(), probabilities[:, 1].max(), probabilities[best, 0], probabilities[best, 1],
        float(np.sort(evidence)[-2:].mean()),
        sentence_features[:, FEATURE_NAMES.index("cosine")].max(),
        sentence_features[:, FEATURE_NAMES.index("claim_recall")].max(),
        np.log(len(probabilities)),
    ])


@dataclass
class DetectorModel:
    version: str
    sentence: LinearSoftmax
    context: LinearSoftmax
    metadata: dict[str, Any] = field(default_factory=dict)

    def predict(self, sentence_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the context's label probabilities, each sentence's) from the sentences' features."""
        per_sentence = self.sentence.predict_proba(sentence_features)
        return self.context.predict_proba(context_features(per_sentence, sentence_features)[None, :])[0], per_sentence

    def weights_bytes(self) -> bytes:
        from safetensors.numpy import save

        tensors = self.sentence.tensors("sentence") | self.context.tensors("context")
        return bytes(save(dict(sorted(tensors.items()))))

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = self.weights_bytes()
        (directory / WEIGHTS_FILE).write_bytes(weights)
        meta = {**self.metadata, "format": FORMAT, "version": self.version, "labels": list(LABELS),
                "features": list(FEATURE_NAMES), "context_features": list(CONTEXT_FEATURE_NAMES),
                "weights_sha256": hashlib.sha256(weights).hexdigest()}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: Path) -> DetectorModel:
        from safetensors import SafetensorError
        from safetensors.numpy import load

        directory = Path(directory)
        meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
        if not meta_path.is_file() or not weights_path.is_file():
            raise ArtifactError(f"{directory}: not a detector artifact (needs {META_FILE} and {WEIGHTS_FILE})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ArtifactError(f"{directory}: {META_FILE} is unreadable: {error}") from error
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise ArtifactError(f"{directory}: format {found!r}, expected {FORMAT!r}")
        if (meta.get("features") != list(FEATURE_NAMES) or meta.get("context_features") != list(CONTEXT_FEATURE_NAMES)
                or meta.get("labels") != list(LABELS)):
            raise ArtifactError(f"{directory}: trained on other features or labels; retrain it")
        weights = weights_path.read_bytes()
        digest = hashlib.sha256(weights).hexdigest()
        if digest != meta.get("weights_sha256") or meta.get("version") != version_of(weights):
            raise ArtifactError(f"{directory}: {WEIGHTS_FILE} does not match {META_FILE} "
                                f"(SHA-256 {digest[:12]}..., version {meta.get('version')!r}): the artifact is corrupt")
        try:
            tensors = load(weights)
        except (SafetensorError, ValueError) as error:
            raise ArtifactError(f"{directory}: {WEIGHTS_FILE} is not a safetensors file: {error}") from error
        sentence = LinearSoftmax.from_tensors(tensors, "sentence", len(FEATURE_NAMES))
        context = LinearSoftmax.from_tensors(tensors, "context", len(CONTEXT_FEATURE_NAMES))
        keep = {k: v for k, v in meta.items() if k not in ("version", "format", "labels", "features",
                                                           "context_features", "weights_sha256")}
        return cls(str(meta["version"]), sentence, context, keep)


def version_of(weights: bytes) -> str:
    return "fd-" + hashlib.sha256(weights).hexdigest()[:12]
