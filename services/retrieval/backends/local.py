"""The local first stage: the collection's in-memory BM25 and FAISS indexes (llmo.retrieval.indexes),
current with the database's generation (updated with the documents changed since, or rebuilt),
searched inside a per-position access/filter mask that also masks out tombstones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from llmo.embedding import Embedder
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.retrieval import candidates, ranking
from llmo.retrieval.backends import FirstStageResult, fetch_size
from llmo.retrieval.candidates import Stage
from llmo.retrieval.indexes import CollectionIndex, IndexManager
from llmo.retrieval.query import QueryPlan
from llmo.retrieval.settings import RetrievalSettings
from llmo.retrieval.storage import CollectionRow


class LocalFirstStage:
    name = "local"
    supports_rerank = True

    def __init__(self, indexes: IndexManager, embedder: Embedder, settings: RetrievalSettings) -> None:
        self.indexes, self.embedder, self.settings = indexes, embedder, settings

    def run(self, coll: CollectionRow, plan: QueryPlan, principals: frozenset[str], filters: Sequence[Any],
            matches: ranking.Predicate, mode: int, fusion: ranking.Fusion, wanted: int, stage: Stage
            ) -> FirstStageResult:
        with stage("index") as report:
            index = self.indexes.current(coll.pk, coll.uid)
            allowed = allowed_mask(index, principals, matches, filtered=bool(filters))
            considered = int(allowed.sum())
            report.items = considered
        vectors = None
        if mode in (pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_HYBRID) and considered:
            with stage("embed") as report:
                vectors = candidates.variant_vectors(plan, self.embedder.encode)
                report.items = len(vectors)
        fetch = fetch_size(mode, wanted, self.settings.overfetch, self.settings.min_candidates)
        fused = candidates.retrieve(index, plan, allowed, mode=mode, fusion=fusion, fetch=fetch, vectors=vectors,
                                    stage=stage) if considered else []
        fused = fused[:wanted]
        return FirstStageResult(considered, fused, [int(index.ids[f.position]) for f in fused],
                                vectors[0] if vectors else None, index)


def allowed_mask(index: CollectionIndex, principals: frozenset[str], matches: ranking.Predicate,
                 filtered: bool = True) -> np.ndarray:
    """Which positions the caller may see and the filters keep, decided per document; the filters
    are evaluated only on readable documents, and not at all when the request has none.
    Tombstones (positions of replaced or deleted chunks) are never allowed."""
    if index.size == 0:
        return np.zeros(0, dtype=bool)
    per_doc = index.readable_documents(principals)
    if filtered:
        readable = np.flatnonzero(per_doc)
        per_doc[readable] = [matches(index.docs[int(i)][2]) for i in readable]
    allowed = per_doc[index.doc_of]
    if index.tombstones:
        allowed &= index.live
    return allowed
