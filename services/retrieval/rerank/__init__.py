"""Second-stage re-ranking of fused candidates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from llmo.retrieval.ranking import Candidate
from llmo.retrieval.settings import RetrievalSettings


class Reranker(Protocol):
    version: str

    def score(self, query: str, candidates: Sequence[Candidate]) -> list[float]:
        """One score per candidate, higher is more relevant (blocking)."""


def load_reranker(settings: RetrievalSettings) -> Reranker | None:
    """The configured reranker, or None when there is none."""
    return None
