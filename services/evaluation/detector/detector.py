"""`Detector`: judges a statement against a context with the committed (or a given) artifact.

All calls block (MiniLM on the CPU and numpy): a service runs them with `asyncio.to_thread`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmo.embedding import Embedder
from llmo.evaluation.detector.data import CONTRADICTED, LABELS, NOT_ENOUGH_INFO, SUPPORTED
from llmo.evaluation.detector.features import pair_features
from llmo.evaluation.detector.model import DetectorModel
from llmo.evaluation.detector.sentences import Sentence, split_sentences

BUILTIN_DIR = Path(__file__).parent / "artifact"
MAX_EVIDENCE = 3  # sentences returned with a verdict
EVIDENCE_MIN_PROBABILITY = 0.5  # further sentences beyond the best one need this sentence probability


@dataclass(frozen=True)
class Evidence:
    """A sentence of the context behind a verdict, with its offsets and its own probability of the
    verdict's label."""

    text: str
    start: int
    end: int
    probability: float


@dataclass(frozen=True)
class Verdict:
    """The label (SUPPORTED, CONTRADICTED, NOT_ENOUGH_INFO), the probability of each label (summing to
    1), and the sentences that support the verdict: for SUPPORTED the supporting sentences, for
    CONTRADICTED the contradicting ones, none for NOT_ENOUGH_INFO. Strongest first."""

    label: str
    probabilities: dict[str, float]
    supporting_sentences: tuple[Evidence, ...]

    @property
    def supported(self) -> bool:
        return self.label == SUPPORTED


@dataclass(frozen=True)
class Faithfulness:
    """Share of the claims judged SUPPORTED by the context, and each claim's verdict."""

    score: float
    verdicts: tuple[Verdict, ...]


class Detector:
    """Thread-safe: the artifact is read-only and MiniLM is shared per process."""

    def __init__(self, model: DetectorModel, embedder: Embedder | None = None) -> None:
        self.model = model
        self.embedder = embedder or Embedder()
        self._lock = threading.Lock()

    @property
    def version(self) -> str:
        return self.model.version

    @classmethod
    def load(cls, directory: Path | None = None, embedder: Embedder | None = None) -> Detector:
        """The artifact in `directory`, by default the committed one; `ArtifactError` if unusable."""
        return cls(DetectorModel.load(directory or BUILTIN_DIR), embedder)

    def judge(self, context: str, statement: str) -> Verdict:
        return self.judge_many([(context, statement)])[0]

    def judge_many(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        """One verdict per (context, statement), with one MiniLM call for all their texts."""
        split = [split_sentences(context) for context, _ in pairs]
        for (_, statement) in pairs:
            if not isinstance(statement, str) or not statement.strip():
                raise ValueError("a statement must be a non-empty string")
        texts = sorted({s.strip() for _, s in pairs} | {x.text for sentences in split for x in sentences})
        with self._lock:
            vectors = self.embedder.encode(texts)
        index = {t: i for i, t in enumerate(texts)}
        verdicts = []
        for (_, statement), sentences in zip(pairs, split, strict=True):
            claim = statement.strip()
            verdicts.append(self._verdict(claim, vectors[index[claim]], sentences,
                                          vectors[[index[x.text] for x in sentences]]))
        return verdicts

    def faithfulness(self, context: str, claims: Sequence[str]) -> Faithfulness:
        """Faithfulness of an answer = the share of its claims the detector finds SUPPORTED."""
        if not claims:
            raise ValueError("faithfulness needs at least one claim")
        verdicts = self.judge_many([(context, claim) for claim in claims])
        return Faithfulness(sum(v.supported for v in verdicts) / len(verdicts), tuple(verdicts))

    def _verdict(self, claim: str, claim_vector: np.ndarray, sentences: list[Sentence],
                 sentence_vectors: np.ndarray) -> Verdict:
        if not sentences:
            return Verdict(NOT_ENOUGH_INFO, {SUPPORTED: 0.0, CONTRADICTED: 0.0, NOT_ENOUGH_INFO: 1.0}, ())
        features = pair_features(claim_vector, claim, sentence_vectors, [s.text for s in sentences])
        probabilities, per_sentence = self.model.predict(features)
        label = LABELS[int(np.argmax(probabilities))]
        evidence: tuple[Evidence, ...] = ()
        if label != NOT_ENOUGH_INFO:
            column = LABELS.index(label)
            order = np.argsort(-per_sentence[:, column], kind="stable")[:MAX_EVIDENCE]
            evidence = tuple(
                Evidence(sentences[i].text, sentences[i].start, sentences[i].end, float(per_sentence[i, column]))
                for rank, i in enumerate(order) if rank == 0 or per_sentence[i, column] >= EVIDENCE_MIN_PROBABILITY)
        return Verdict(label, {name: float(p) for name, p in zip(LABELS, probabilities, strict=True)}, evidence)
