"""Second-stage re-ranking of fused candidates.

The reranker is a learned LambdaRank model (`model.py`) over cheap serve-time features
(`features.py`); no cross-encoder ships in a package that loads offline. `LLMO_RETRIEVAL_RERANKER`
picks the artifact: "builtin" (the one committed in `builtin/`), a directory, or "" for none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from llmo.core.logging import get_logger
from llmo.retrieval.indexes import CollectionIndex, query_terms
from llmo.retrieval.ranking import Candidate
from llmo.retrieval.rerank.features import RerankInput
from llmo.retrieval.rerank.model import ArtifactError, LearnedReranker
from llmo.retrieval.settings import RetrievalSettings

log = get_logger(__name__)

BUILTIN = "builtin"
BUILTIN_DIR = Path(__file__).parent / "builtin"

__all__ = ["BUILTIN", "BUILTIN_DIR", "ArtifactError", "LearnedReranker", "RerankInput", "Reranker", "load_reranker",
           "rerank_input"]


class Reranker(Protocol):
    version: str

    def score(self, batch: RerankInput) -> list[float]:
        """One score per candidate of `batch`, higher is more relevant (blocking)."""


def load_reranker(settings: RetrievalSettings) -> Reranker | None:
    """The configured reranker, or None when `LLMO_RETRIEVAL_RERANKER` is empty.

    A configured artifact that cannot be loaded stops the service at start (ArtifactError) rather
    than serving without the stage it was asked for."""
    choice = settings.reranker.strip()
    if not choice:
        return None
    reranker = LearnedReranker.load(BUILTIN_DIR if choice == BUILTIN else Path(choice))
    log.info("reranker loaded", version=reranker.version, artifact=choice)
    return reranker


def rerank_input(index: CollectionIndex, query: str, query_vector: np.ndarray, candidates: Sequence[Candidate],
                 encode: Callable[[list[str]], np.ndarray]) -> RerankInput:
    """The candidates' vectors (read back from the dense index) and full BM25 scores for `query`.

    Candidates are found in the index by chunk id, so it works for any first stage (the graph's
    candidates have no index position); a chunk missing from the index (replaced since) is
    embedded from its text and gets a BM25 score of 0."""
    wanted = np.array([c.chunk.id for c in candidates], dtype=np.int64)
    positions, found = _positions(index, wanted, np.array([c.fused.position for c in candidates], dtype=np.int64))
    vectors = np.zeros((len(candidates), query_vector.shape[0]), dtype=np.float32)
    bm25 = np.zeros(len(candidates), dtype=np.float64)
    if found.any():
        vectors[found] = index.dense.reconstruct_batch(positions[found].astype(np.int64))
        terms = [t for t in query_terms(query) if index.bm25 is not None and t in index.bm25.vocab_dict]
        if terms:
            bm25[found] = np.asarray(index.bm25.get_scores(terms), dtype=np.float64)[positions[found]]
    if not found.all():
        missing = np.flatnonzero(~found)
        vectors[missing] = encode([candidates[int(i)].chunk.text for i in missing])
    return RerankInput(query, query_vector, candidates, vectors, bm25)


def _positions(index: CollectionIndex, chunk_ids: np.ndarray, hints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index positions of `chunk_ids` and which were found; `hints` are the first stage's positions,
    right for dense/sparse/hybrid candidates, checked and otherwise looked up by id."""
    if index.size == 0:
        return np.zeros(len(chunk_ids), dtype=np.int64), np.zeros(len(chunk_ids), dtype=bool)
    positions = np.clip(hints, 0, index.size - 1)
    found = index.ids[positions] == chunk_ids
    if not found.all():
        order = np.argsort(index.ids, kind="stable")
        slots = np.minimum(np.searchsorted(index.ids[order], chunk_ids[~found]), index.size - 1)
        positions[~found] = order[slots]
        found = index.ids[positions] == chunk_ids
    return positions, found
