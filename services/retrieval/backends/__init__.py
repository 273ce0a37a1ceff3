"""Where the first stage of a search runs (`LLMO_RETRIEVAL_BACKEND`).

- `local` (the default, `backends/local.py`): every replica derives its own BM25 (bm25s) and FAISS
  indexes from the store of record and searches them in memory.
- `pgvector` (`backends/pgvector.py`): the dense and sparse first stage run inside PostgreSQL
  (pgvector HNSW + full-text search), so every replica shares one index and writes are visible to
  the next search on any replica.

Both implement `FirstStage`: from a query plan to the candidates fusion produced, each with its
chunk id, after access control and metadata filters were applied inside each retriever.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from llmo.core import storage as core_storage
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.retrieval import ranking
from llmo.retrieval.candidates import Stage
from llmo.retrieval.indexes import CollectionIndex
from llmo.retrieval.query import QueryPlan
from llmo.retrieval.storage import CollectionRow

BACKENDS = ("local", "pgvector")


@dataclass
class FirstStageResult:
    considered: int  # chunks the caller may read that the filters keep
    fused: list[ranking.Fused]  # best first
    chunk_ids: list[int]  # the chunk id of each of `fused`
    query_vector: np.ndarray | None  # the first variant's (None when nothing was embedded)
    index: CollectionIndex | None  # the local index searched (None on other backends)


class FirstStage(Protocol):
    name: str
    supports_rerank: bool  # the reranker reads BM25 scores and vectors from the local index

    def run(self, coll: CollectionRow, plan: QueryPlan, principals: frozenset[str], filters: Sequence[Any],
            matches: ranking.Predicate, mode: int, fusion: ranking.Fusion, wanted: int, stage: Stage
            ) -> FirstStageResult:
        """Blocking: runs off the event loop. `filters` are the request's (already checked by
        `ranking.compile_filters`, which made `matches`)."""
        ...


def check(backend: str, database_url: str) -> None:
    """Stop the service at start on a backend it cannot run (ValueError with the fix)."""
    if backend not in BACKENDS:
        raise ValueError(f"LLMO_RETRIEVAL_BACKEND={backend!r} is not a backend; use one of {', '.join(BACKENDS)}")
    if backend == "pgvector" and not core_storage.normalize_url(database_url).startswith("postgresql"):
        raise ValueError("LLMO_RETRIEVAL_BACKEND=pgvector needs a PostgreSQL database with the pgvector extension: "
                         "set LLMO_RETRIEVAL_DATABASE_URL=postgresql://... (it is "
                         f"{'unset' if not database_url else 'not PostgreSQL'})")


def fetch_size(mode: int, wanted: int, overfetch: int, min_candidates: int) -> int:
    """Candidates each retriever returns: `wanted`, or more in HYBRID mode (fusion needs depth)."""
    return wanted if mode != pb.SEARCH_MODE_HYBRID else max(wanted * overfetch, min_candidates)
