"""First-stage retrieval over a collection's indexes: every query variant through the dense and
sparse retrievers, fused per variant, then across variants. Blocking; runs off the event loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.retrieval import ranking
from llmo.retrieval.indexes import Hit
from llmo.retrieval.query import QueryPlan

Stage = Callable[[str], Any]  # StageLog.stage


class Retrievers(Protocol):
    """What `retrieve` searches: a collection's local indexes (`CollectionIndex`, hits by index
    position, `allowed` a mask) or a backend's (llmo.retrieval.backends.pgvector, hits by chunk id)."""

    def dense_search(self, vector: np.ndarray, allowed: Any, k: int) -> list[Hit]: ...

    def sparse(self, query: str, allowed: Any, k: int) -> list[Hit]: ...


def variant_vectors(plan: QueryPlan, encode: Callable[[list[str]], np.ndarray]) -> list[np.ndarray]:
    """One unit vector per variant: the normalised mean of its texts' embeddings (one forward pass for all)."""
    texts = [t for v in plan.variants for t in v.embed_texts]
    vectors = np.asarray(encode(texts), dtype=np.float32)
    out, start = [], 0
    for variant in plan.variants:
        mean = vectors[start:start + len(variant.embed_texts)].mean(axis=0)
        start += len(variant.embed_texts)
        norm = float(np.linalg.norm(mean))
        out.append(mean / norm if norm > 0 else mean)
    return out


def retrieve(index: Retrievers, plan: QueryPlan, allowed: Any, *, mode: int, fusion: ranking.Fusion,
             fetch: int, vectors: Sequence[np.ndarray] | None, stage: Stage) -> list[ranking.Fused]:
    """Fused candidates, best first. `vectors` (one per variant) are needed for DENSE and HYBRID."""
    dense_lists: list[list[Hit]] = []
    sparse_lists: list[list[Hit]] = []
    if mode in (pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_HYBRID) and vectors is not None:
        with stage("dense") as report:
            dense_lists = [index.dense_search(v, allowed, fetch) for v in vectors]
            report.items = sum(len(h) for h in dense_lists)
    if mode in (pb.SEARCH_MODE_SPARSE, pb.SEARCH_MODE_HYBRID):
        with stage("sparse") as report:
            sparse_lists = [index.sparse(v.text, allowed, fetch) for v in plan.variants]
            report.items = sum(len(h) for h in sparse_lists)
    with stage("fusion") as report:
        per_variant = []
        for i in range(len(plan.variants)):
            dense = dense_lists[i] if dense_lists else []
            sparse = sparse_lists[i] if sparse_lists else []
            if mode == pb.SEARCH_MODE_HYBRID:
                per_variant.append(ranking.fuse(dense, sparse, fusion))
            else:
                per_variant.append(ranking.single(dense if mode == pb.SEARCH_MODE_DENSE else sparse,
                                                  dense=mode == pb.SEARCH_MODE_DENSE))
        fused = ranking.fuse_lists(per_variant, fusion.rrf_k)
        report.items = len(fused)
    return fused
