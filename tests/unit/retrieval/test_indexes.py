"""Dense index choice and search: exact flat below the HNSW threshold, HNSW above it, the access
filter inside HNSW, the exact fallback for selective filters, persistence of either kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmo.embedding import EMBEDDING_DIM
from llmo.retrieval.indexes import CollectionIndex, DenseConfig, Hit
from llmo.retrieval.storage import IndexedChunk

N = 3000
HNSW = DenseConfig(hnsw_min_chunks=1000, m=16, ef_construction=64, ef_search=64, exact_below=100)


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((32, EMBEDDING_DIM)).astype(np.float32)
    x = centers[rng.integers(0, 32, n)] + 0.6 * rng.standard_normal((n, EMBEDDING_DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _chunks(vectors: np.ndarray) -> list[IndexedChunk]:
    # ten chunks per document; every third document is restricted to group:g
    return [IndexedChunk(id=i + 1, document_id=f"d{i // 10}", text=f"chunk {i} word{i % 7}", embedding=v.tobytes(),
                         acl=("group:g",) if (i // 10) % 3 == 0 else (), metadata={"n": i // 10})
            for i, v in enumerate(vectors)]


@pytest.fixture(scope="module")
def corpus() -> tuple[np.ndarray, np.ndarray]:
    vectors = _vectors(N + 50)
    return vectors[:N], vectors[N:]


def _exact(vectors: np.ndarray, query: np.ndarray, allowed: np.ndarray, k: int) -> list[int]:
    scores = np.where(allowed, vectors @ query, -np.inf)
    order = np.argsort(-scores, kind="stable")[:k]
    return [int(p) for p in order if allowed[p]]


def _positions(hits: list[Hit]) -> list[int]:
    return [h.position for h in hits]


def test_below_the_threshold_the_index_is_exact_flat(corpus: tuple[np.ndarray, np.ndarray]) -> None:
    vectors, queries = corpus
    index = CollectionIndex.build(1, _chunks(vectors), k1=1.2, b=0.75, dense_config=DenseConfig(hnsw_min_chunks=N + 1))
    assert not index.is_hnsw
    everything = np.ones(N, dtype=bool)
    for q in queries[:10]:
        assert _positions(index.dense_search(q, everything, 10)) == _exact(vectors, q, everything, 10)


def test_hnsw_above_the_threshold_keeps_recall_and_the_filter(corpus: tuple[np.ndarray, np.ndarray]) -> None:
    vectors, queries = corpus
    index = CollectionIndex.build(1, _chunks(vectors), k1=1.2, b=0.75, dense_config=HNSW)
    index.config = HNSW
    assert index.is_hnsw and index.dense.ntotal == N
    everything = np.ones(N, dtype=bool)
    restricted = (np.arange(N) // 10) % 3 != 0  # an outsider: group:g's documents are hidden
    recall, recall_filtered = [], []
    for q in queries:
        hits = index.dense_search(q, everything, 10)
        recall.append(len(set(_positions(hits)) & set(_exact(vectors, q, everything, 10))) / 10)
        filtered = index.dense_search(q, restricted, 10)
        assert len(filtered) == 10 and all(restricted[h.position] for h in filtered)
        recall_filtered.append(len(set(_positions(filtered)) & set(_exact(vectors, q, restricted, 10))) / 10)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert np.mean(recall) >= 0.95 and np.mean(recall_filtered) >= 0.95


def test_hnsw_with_a_selective_filter_searches_the_allowed_set_exactly(corpus: tuple[np.ndarray, np.ndarray]) -> None:
    vectors, queries = corpus
    index = CollectionIndex.build(1, _chunks(vectors), k1=1.2, b=0.75, dense_config=HNSW)
    index.config = HNSW
    for allowed_count in (3, 40, HNSW.exact_below + 50):
        allowed = np.zeros(N, dtype=bool)
        allowed[np.random.default_rng(allowed_count).choice(N, allowed_count, replace=False)] = True
        for q in queries[:5]:
            hits = index.dense_search(q, allowed, 10)
            expected = _exact(vectors, q, allowed, 10)
            assert len(hits) == min(10, allowed_count)
            if allowed_count <= HNSW.exact_below:  # exact over the subset: the same list as brute force
                assert _positions(hits) == expected
            assert all(allowed[p] for p in _positions(hits))
    assert index.dense_search(queries[0], np.zeros(N, dtype=bool), 10) == []


def test_either_kind_survives_save_and_load(corpus: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    vectors, queries = corpus
    for config in (HNSW, DenseConfig()):
        index = CollectionIndex.build(7, _chunks(vectors), k1=1.2, b=0.75, dense_config=config)
        index.config = config
        folder = tmp_path / ("hnsw" if index.is_hnsw else "flat")
        index.save(folder)
        loaded = CollectionIndex.load(folder)
        assert loaded is not None and loaded.generation == 7 and loaded.is_hnsw == index.is_hnsw
        loaded.config = config
        everything = np.ones(N, dtype=bool)
        assert _positions(loaded.dense_search(queries[0], everything, 10)) == \
            _positions(index.dense_search(queries[0], everything, 10))


def test_readability_and_filters_decide_exactly_as_the_per_document_rules() -> None:
    from llmo.retrieval import ranking
    from llmo.retrieval.backends.local import allowed_mask

    rng = np.random.default_rng(3)
    groups = ["group:a", "group:b", "user:c", "user:d"]
    chunks = [IndexedChunk(id=i + 1, document_id=f"d{i // 2}", text=f"t{i}", embedding=v.tobytes(),
                           acl=tuple(g for g in groups if rng.random() < 0.3) if (i // 2) % 4 else (),
                           metadata={"n": (i // 2) % 5})
              for i, v in enumerate(_vectors(80))]
    index = CollectionIndex.build(1, chunks, k1=1.2, b=0.75)
    even = ranking.compile_filters([])
    for principals in (frozenset(), frozenset({"group:a"}), frozenset({"user:c", "group:b"}), frozenset(groups)):
        expected = [ranking.visible(acl, principals) for _, acl, _ in index.docs]
        assert index.readable_documents(principals).tolist() == expected
        small = lambda metadata: metadata["n"] < 2  # noqa: E731
        mask = allowed_mask(index, principals, small)
        assert mask.tolist() == [expected[d] and index.docs[d][2]["n"] < 2 for d in index.doc_of]
        assert allowed_mask(index, principals, even, filtered=False).tolist() == [expected[d] for d in index.doc_of]
