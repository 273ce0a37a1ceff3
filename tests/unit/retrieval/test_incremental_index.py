"""Incremental updates of a collection's local indexes (`CollectionIndex.apply`): after every add,
replace, delete and access change, the updated index ranks exactly as a fresh build of the same
chunks (flat: identical hits and scores; HNSW: the clear-cut neighbours), tombstones never
surface, compaction and the flat/HNSW switch happen when they should, and an updated index
survives save and load."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmo.embedding import EMBEDDING_DIM
from llmo.retrieval import ranking
from llmo.retrieval.backends.local import allowed_mask
from llmo.retrieval.indexes import CollectionIndex, DenseConfig, query_terms
from llmo.retrieval.storage import IndexChanges, IndexedChunk

K1, B = 1.2, 0.75
WORDS = ["volcano", "magma", "penguin", "antarctic", "flour", "butter", "oven", "glucose", "sunlight", "crust",
         "merger", "price", "pipeline", "engineer", "winter", "battery", "rainfall", "pressure", "widget", "humidity"]
PRINCIPALS = [frozenset(), frozenset({"group:a"}), frozenset({"user:b", "group:c"})]
QUERIES = ["volcano magma crust", "penguin winter", "flour butter oven price", "battery pressure widget", "merger"]
FLAT = DenseConfig(hnsw_min_chunks=10**9)


@dataclass
class Collection:
    """A stand-in for the store of record: documents with access lists, metadata and chunks (ids only grow)."""

    rng: np.random.Generator
    documents: dict[str, tuple[tuple[str, ...], dict[str, Any], list[IndexedChunk]]] = field(default_factory=dict)
    next_id: int = 1
    generation: int = 1
    centers: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        self.centers = self.rng.standard_normal((8, EMBEDDING_DIM)).astype(np.float32)

    def chunks(self) -> list[IndexedChunk]:
        return sorted((c for _, _, cs in self.documents.values() for c in cs), key=lambda c: c.id)

    def _make(self, document_id: str, acl: tuple[str, ...], metadata: dict[str, Any], n: int) -> list[IndexedChunk]:
        out = []
        for _ in range(n):
            text = " ".join(self.rng.choice(WORDS, int(self.rng.integers(0, 12))))  # some chunks have no terms
            v = self.centers[self.rng.integers(0, 8)] + 0.5 * self.rng.standard_normal(EMBEDDING_DIM).astype(np.float32)
            v /= np.linalg.norm(v)
            out.append(IndexedChunk(self.next_id, document_id, text, v.astype(np.float32).tobytes(), acl, metadata))
            self.next_id += 1
        return out

    def write(self, document_id: str, n: int, acl: tuple[str, ...] = (), metadata: dict[str, Any] | None = None
              ) -> IndexChanges:
        """Add or replace a document (new chunks, new ids)."""
        metadata = metadata if metadata is not None else {"n": int(self.rng.integers(0, 4))}
        self.documents[document_id] = (acl, metadata, self._make(document_id, acl, metadata, n))
        return self._changes({document_id}, {document_id})

    def delete(self, document_id: str) -> IndexChanges:
        del self.documents[document_id]
        return self._changes({document_id}, {document_id})

    def set_access(self, document_id: str, acl: tuple[str, ...], metadata: dict[str, Any]) -> IndexChanges:
        """An access-list / metadata change: same chunks, nothing re-embedded."""
        _, _, chunks = self.documents[document_id]
        self.documents[document_id] = (acl, metadata, [IndexedChunk(c.id, c.document_id, c.text, c.embedding, acl,
                                                                    metadata) for c in chunks])
        return self._changes(set(), {document_id})

    def _changes(self, content: set[str], changed: set[str]) -> IndexChanges:
        since, self.generation = self.generation, self.generation + 1
        chunks = sorted((c for d in content if d in self.documents for c in self.documents[d][2]), key=lambda c: c.id)
        access = {d: (self.documents[d][0], self.documents[d][1]) for d in changed if d in self.documents}
        return IndexChanges(since, self.generation, frozenset(content), chunks, access)


def _vector(chunk: IndexedChunk) -> np.ndarray:
    return np.frombuffer(chunk.embedding, dtype=np.float32)


def _query_vectors(coll: Collection, n: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(99)
    out = []
    for center in coll.centers[:n]:
        v = center + 0.3 * rng.standard_normal(EMBEDDING_DIM).astype(np.float32)
        out.append((v / np.linalg.norm(v)).astype(np.float32))
    return out


def _filters() -> list[tuple[bool, ranking.Predicate]]:
    return [(False, ranking.compile_filters([])), (True, lambda m: m.get("n", 0) < 2)]


def _ranked(index: CollectionIndex, coll: Collection, k: int = 8) -> list[Any]:
    """Everything a search reads from the index, by chunk id: per principal and filter, the allowed
    count, BM25 hits with scores, dense hits with scores."""
    out: list[Any] = []
    for principals, (filtered, matches) in itertools.product(PRINCIPALS, _filters()):
        allowed = allowed_mask(index, principals, matches, filtered=filtered)
        out.append(("allowed", sorted(int(i) for i in index.ids[allowed])))
        for query in QUERIES:
            out.append(("sparse", query, [(int(index.ids[h.position]), h.score) for h in index.sparse(query, allowed, k)]))
        for vector in _query_vectors(coll):
            out.append(("dense", [(int(index.ids[h.position]), h.score) for h in index.dense_search(vector, allowed, k)]))
    return out


def _fresh(coll: Collection, config: DenseConfig) -> CollectionIndex:
    index = CollectionIndex.build(coll.generation, coll.chunks(), k1=K1, b=B, dense_config=config)
    index.config = config
    return index


def _apply(index: CollectionIndex, changes: IndexChanges, config: DenseConfig) -> tuple[CollectionIndex, bool]:
    applied = index.apply(changes, k1=K1, b=B, dense_config=config)
    assert applied is not None
    updated, compacted = applied
    updated.config = config
    assert updated.generation == changes.generation
    return updated, compacted


def _script(coll: Collection) -> Iterator[IndexChanges]:
    """Adds, replaces (growing and shrinking), access changes, deletes, a delete-then-re-add and a
    document left with no chunk, in an order that leaves tombstones between live chunks; each
    change is made to `coll` as it is yielded."""
    for i in range(12):
        yield coll.write(f"d{i}", int(coll.rng.integers(1, 6)), acl=("group:a",) if i % 3 == 0 else ())
    yield coll.write("d3", 7)
    yield coll.set_access("d4", ("user:b",), {"n": 0})
    yield coll.delete("d5")
    yield coll.write("d1", 1, acl=("group:c",))
    yield coll.set_access("d1", (), {"n": 3})
    yield coll.write("d12", 4)
    yield coll.delete("d0")
    yield coll.write("d0", 2, acl=("group:a", "user:b"))
    yield coll.write("d7", 0)
    yield coll.delete("d9")
    yield coll.write("d2", 3, metadata={"n": 1})


@pytest.mark.parametrize("share", [0.0, 0.2, 1.0])
def test_flat_updates_rank_exactly_as_a_fresh_build(share: float) -> None:
    config = DenseConfig(hnsw_min_chunks=10**9, rebuild_tombstone_share=share)
    coll = Collection(np.random.default_rng(1))
    index = CollectionIndex.empty(coll.generation, k1=K1, b=B, dense_config=config)
    compactions = 0
    for changes in _script(coll):
        index, compacted = _apply(index, changes, config)
        compactions += compacted
        fresh = _fresh(coll, config)
        assert sorted(int(i) for i in index.ids[index.live]) == [c.id for c in coll.chunks()]
        assert index.tombstones <= max(share * index.size, 0) + 1e-9 or share == 1.0
        assert _ranked(index, coll) == _ranked(fresh, coll)
        assert not index.is_hnsw
    if share == 1.0:
        assert compactions == 0 and index.tombstones > 0  # tombstones kept and masked out all along
    if share == 0.0:
        assert index.tombstones == 0 and compactions > 0


def test_tombstones_past_the_share_compact_the_index() -> None:
    config = DenseConfig(hnsw_min_chunks=10**9, rebuild_tombstone_share=0.25)
    coll = Collection(np.random.default_rng(2))
    index = CollectionIndex.empty(1, k1=K1, b=B, dense_config=config)
    for i in range(10):
        index, _ = _apply(index, coll.write(f"d{i}", 4), config)
    assert index.size == 40 and index.tombstones == 0
    index, compacted = _apply(index, coll.delete("d0"), config)
    index, compacted_too = _apply(index, coll.delete("d1"), config)
    assert not compacted and not compacted_too and index.tombstones == 8 and index.size == 40
    assert set(index.ids[~index.live].tolist()) == {-1}
    index, compacted = _apply(index, coll.delete("d2"), config)  # 12 of 40 > 25 %
    assert compacted and index.tombstones == 0 and index.size == 28 and index.dense.ntotal == 28
    assert _ranked(index, coll) == _ranked(_fresh(coll, config), coll)
    assert len(index.terms.tokens) == len(_fresh(coll, config).terms.tokens)  # compaction drops unused tokens too


def test_a_field_only_change_refreshes_access_without_touching_chunks() -> None:
    coll = Collection(np.random.default_rng(3))
    index = CollectionIndex.empty(1, k1=K1, b=B, dense_config=FLAT)
    for i in range(4):
        index, _ = _apply(index, coll.write(f"d{i}", 3), FLAT)
    before = index
    index, _ = _apply(index, coll.set_access("d1", ("user:z",), {"n": 9}), FLAT)
    assert index.size == before.size and index.tombstones == 0 and index.dense.ntotal == before.dense.ntotal
    assert (index.ids == before.ids).all()
    d1 = next(n for n, (d, _, _) in enumerate(index.docs) if d == "d1")
    assert index.docs[d1][1:] == (["user:z"], {"n": 9})
    hidden = allowed_mask(index, frozenset(), ranking.compile_filters([]), filtered=False)
    assert not hidden[index.doc_of == d1].any() and hidden[index.doc_of != d1].all()
    assert allowed_mask(before, frozenset(), ranking.compile_filters([]), filtered=False).all()  # the old one is untouched


def test_hnsw_updates_find_what_flat_finds_and_switch_kind_at_the_threshold() -> None:
    hnsw = DenseConfig(hnsw_min_chunks=60, m=16, ef_construction=80, ef_search=64, exact_below=0,
                       rebuild_tombstone_share=0.5)
    coll = Collection(np.random.default_rng(4))
    index = CollectionIndex.empty(1, k1=K1, b=B, dense_config=hnsw)
    kinds, compacted_on = [], []
    for i in range(30):
        index, compacted = _apply(index, coll.write(f"d{i}", 4), hnsw)
        kinds.append(index.is_hnsw)
        if compacted:
            compacted_on.append(i)
    assert kinds.index(True) == 14 and all(kinds[14:])  # 60 live chunks: rebuilt as HNSW once
    assert compacted_on == [14]
    steps: list[Callable[[], IndexChanges]] = [
        lambda: coll.write("d3", 6), lambda: coll.delete("d20"), lambda: coll.set_access("d8", ("group:a",), {"n": 1}),
        lambda: coll.write("d31", 5), lambda: coll.delete("d11")]
    for step in steps:
        index, _ = _apply(index, step(), hnsw)
        assert index.is_hnsw and index.tombstones > 0
        fresh_flat = _fresh(coll, FLAT)
        everything = ranking.compile_filters([])
        allowed = allowed_mask(index, frozenset(), everything, filtered=False)
        flat_allowed = allowed_mask(fresh_flat, frozenset(), everything, filtered=False)
        assert sorted(index.ids[allowed].tolist()) == sorted(fresh_flat.ids[flat_allowed].tolist())
        readable = set(index.ids[allowed].tolist())
        for chunk in [c for c in coll.chunks() if c.id in readable][::5]:  # clear-cut: a chunk's own vector, moved a little
            vector = _vector(chunk) + 0.01 * np.random.default_rng(chunk.id).standard_normal(EMBEDDING_DIM).astype(np.float32)
            vector /= np.linalg.norm(vector)
            got = [int(index.ids[h.position]) for h in index.dense_search(vector, allowed, 5)]
            want = [int(fresh_flat.ids[h.position]) for h in fresh_flat.dense_search(vector, flat_allowed, 5)]
            assert got[0] == want[0] == chunk.id
            assert len(set(got) & set(want)) >= 4
        for query in QUERIES:  # BM25 does not depend on the dense kind: identical
            assert [(int(index.ids[h.position]), h.score) for h in index.sparse(query, allowed, 10)] == \
                [(int(fresh_flat.ids[h.position]), h.score) for h in fresh_flat.sparse(query, flat_allowed, 10)]
    for i in range(32):  # shrinking below the threshold goes back to exact flat, as a build would
        if f"d{i}" in coll.documents and len(coll.chunks()) >= 40:
            index, compacted = _apply(index, coll.delete(f"d{i}"), hnsw)
            assert index.is_hnsw == (len(coll.chunks()) >= 60)
            if compacted:
                assert index.tombstones == 0
    assert not index.is_hnsw
    assert _ranked(index, coll) == _ranked(_fresh(coll, hnsw), coll)


def test_an_updated_index_survives_save_and_load_and_keeps_updating(tmp_path: Path) -> None:
    config = DenseConfig(hnsw_min_chunks=10**9, rebuild_tombstone_share=0.9)
    coll = Collection(np.random.default_rng(5))
    index = CollectionIndex.empty(1, k1=K1, b=B, dense_config=config)
    for changes in itertools.islice(_script(coll), 15):
        index, _ = _apply(index, changes, config)
    assert index.tombstones > 0
    index.save(tmp_path / "idx")
    loaded = CollectionIndex.load(tmp_path / "idx")
    assert loaded is not None
    loaded.config = config
    assert loaded.generation == index.generation and loaded.tombstones == index.tombstones
    assert loaded.params == (K1, B) and loaded.terms is not None and loaded.terms.tokens == index.terms.tokens
    assert _ranked(loaded, coll) == _ranked(index, coll)
    loaded, _ = _apply(loaded, coll.write("d40", 3), config)
    loaded, _ = _apply(loaded, coll.delete("d3"), config)
    loaded, _ = _apply(loaded, coll.set_access("d4", (), {"n": 2}), config)
    assert _ranked(loaded, coll) == _ranked(_fresh(coll, config), coll)


@pytest.mark.parametrize("damage", ["dense.faiss", "ids.npy", "docs.json", "meta.json", "terms_ptr.npy", "tokens.json"])
def test_a_damaged_persisted_index_is_unreadable_not_a_crash(tmp_path: Path, damage: str) -> None:
    coll = Collection(np.random.default_rng(6))
    index = CollectionIndex.empty(1, k1=K1, b=B, dense_config=FLAT)
    for i in range(5):
        index, _ = _apply(index, coll.write(f"d{i}", 3), FLAT)
    index, _ = _apply(index, coll.delete("d1"), FLAT)
    index.save(tmp_path / "idx")
    assert CollectionIndex.load(tmp_path / "idx") is not None
    (tmp_path / "idx" / damage).write_bytes(b"\x93NUMPY garbage" if damage.endswith(".npy") else b"{not json")
    assert CollectionIndex.load(tmp_path / "idx") is None
    assert CollectionIndex.load(tmp_path / "missing") is None


def test_an_inconsistent_persisted_index_is_refused(tmp_path: Path) -> None:
    coll = Collection(np.random.default_rng(7))
    index = CollectionIndex.empty(1, k1=K1, b=B, dense_config=FLAT)
    index, _ = _apply(index, coll.write("d0", 4), FLAT)
    index.save(tmp_path / "idx")
    np.save(tmp_path / "idx" / "live.npy", np.ones(3, dtype=bool))  # readable, but for another index
    assert CollectionIndex.load(tmp_path / "idx") is None


def test_chunk_ids_out_of_order_are_refused_for_a_rebuild() -> None:
    coll = Collection(np.random.default_rng(8))
    index = CollectionIndex.empty(1, k1=K1, b=B, dense_config=FLAT)
    index, _ = _apply(index, coll.write("d0", 4), FLAT)
    low = IndexedChunk(1, "x", "volcano", index.dense.reconstruct(0).tobytes(), (), {})  # id 1 is live already
    assert index.apply(IndexChanges(2, 3, frozenset({"x"}), [low], {"x": ((), {})}), k1=K1, b=B,
                       dense_config=FLAT) is None
    assert CollectionIndex(1, index.ids, index.doc_of, index.docs, index.bm25, index.dense).apply(
        IndexChanges(2, 3, frozenset(), [], {}), k1=K1, b=B) is None  # built without its terms: rebuild


def test_bm25_from_stored_terms_scores_as_bm25s_indexing_the_text() -> None:
    import bm25s

    from llmo.retrieval.indexes import BM25_METHOD, STOPWORDS, _stemmer

    coll = Collection(np.random.default_rng(9))
    for i in range(20):
        coll.write(f"d{i}", 5)
    chunks = coll.chunks()
    ours = _fresh(coll, FLAT)
    reference = bm25s.BM25(k1=K1, b=B, method=BM25_METHOD)
    reference.index(bm25s.tokenize([c.text for c in chunks], lower=True, stopwords=STOPWORDS, stemmer=_stemmer(),
                                   show_progress=False), show_progress=False)
    for query in QUERIES:
        terms = query_terms(query)
        mine = np.asarray(ours.bm25.get_scores([t for t in terms if t in ours.bm25.vocab_dict]))
        theirs = np.asarray(reference.get_scores([t for t in terms if t in reference.vocab_dict]))
        assert mine.tolist() == pytest.approx(theirs.tolist(), rel=1e-6, abs=1e-7)
        assert mine.max() > 0


def test_the_tombstone_share_comes_from_the_settings() -> None:
    from pydantic import ValidationError

    from llmo.retrieval.settings import RetrievalSettings

    assert DenseConfig.of(RetrievalSettings()).rebuild_tombstone_share == 0.2
    assert DenseConfig.of(RetrievalSettings(index_rebuild_tombstone_share=0.5)).rebuild_tombstone_share == 0.5
    with pytest.raises(ValidationError):
        RetrievalSettings(index_rebuild_tombstone_share=1.5)
