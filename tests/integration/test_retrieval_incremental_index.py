"""The local index kept current from the store of record (SQLite and PostgreSQL) by applying the
documents changed since its generation (`index_changes`): each write is applied, not rebuilt,
and the result ranks exactly as a full build from the database; a restart loads the persisted
index and applies what changed while it was down; an unknown or pruned history, a damaged
folder or other BM25 settings make a full build instead."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from llmo.embedding import EMBEDDING_DIM
from llmo.retrieval import ranking, storage
from llmo.retrieval.backends.local import allowed_mask
from llmo.retrieval.indexes import CollectionIndex, DenseConfig, IndexManager
from llmo.retrieval.storage import ChunkRow, CollectionRow, DocumentRow, RetrievalStore, now_us

WORDS = ["volcano", "magma", "penguin", "antarctic", "flour", "butter", "oven", "glucose", "sunlight", "crust",
         "merger", "price", "pipeline", "engineer", "winter", "battery"]
QUERIES = ["volcano magma", "penguin winter antarctic", "flour butter price", "engineer pipeline battery"]
PRINCIPALS = [frozenset(), frozenset({"group:a"}), frozenset({"user:b"})]
FLAT = DenseConfig(hnsw_min_chunks=10**9, rebuild_tombstone_share=0.3)
RNG = np.random.default_rng(11)


def _doc(document_id: str, n: int, acl: list[str] | None = None, metadata: dict[str, int] | None = None) -> DocumentRow:
    chunks = []
    for i in range(n):
        v = RNG.standard_normal(EMBEDDING_DIM).astype(np.float32)
        chunks.append(ChunkRow(idx=i, text=" ".join(RNG.choice(WORDS, 8)), heading_path=[], start_offset=0,
                               end_offset=1, token_count=8, embedding=(v / np.linalg.norm(v)).astype(np.float32).tobytes()))
    return DocumentRow(document_id=document_id, content_sha256=uuid.uuid4().hex * 2, size_bytes=1, mime_type="text/plain",
                       display_name="", source_uri="", metadata=metadata or {"n": n % 3}, acl=acl or [], chunks=chunks)


def _collection(store: RetrievalStore, name: str = "c") -> CollectionRow:
    stamp = now_us()
    return store.create_collection(CollectionRow(
        pk=0, uid=uuid.uuid4().hex, tenant="t", collection_id=name, display_name="", description="", labels={},
        embedding_model="all-MiniLM-L6-v2", chunk_size=256, chunk_overlap=32, strategy=3, etag="e",
        create_request_id="", generation=1, create_us=stamp, update_us=stamp))


def _ranked(index: CollectionIndex) -> list[object]:
    """What searches read, by chunk id: the allowed chunks and the BM25 and dense rankings, per principal."""
    rng = np.random.default_rng(5)
    vectors = [(v / np.linalg.norm(v)).astype(np.float32) for v in rng.standard_normal((3, EMBEDDING_DIM))]
    out: list[object] = []
    for principals in PRINCIPALS:
        for filtered, matches in ((False, ranking.compile_filters([])), (True, lambda m: m.get("n", 0) != 1)):
            allowed = allowed_mask(index, principals, matches, filtered=filtered)
            out.append(sorted(index.ids[allowed].tolist()))
            out += [[(int(index.ids[h.position]), h.score) for h in index.sparse(q, allowed, 6)] for q in QUERIES]
            out += [[(int(index.ids[h.position]), h.score) for h in index.dense_search(v, allowed, 6)] for v in vectors]
    return out


def _fresh(store: RetrievalStore, coll: CollectionRow, root: Path) -> CollectionIndex:
    """A full build from the database, in a folder of its own."""
    manager = IndexManager(store, root / uuid.uuid4().hex, k1=1.2, b=0.75, dense=FLAT)
    index = manager.current(coll.pk, coll.uid)
    assert manager.full_builds == 1 and manager.updates == 0
    return index


def _changes_rows(store: RetrievalStore, pk: int) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(storage.index_changes).where(
            storage.index_changes.c.collection_pk == pk)).scalar() or 0)


def test_every_write_is_applied_and_ranks_as_a_full_build(database_url: str, tmp_path: Path) -> None:
    store = RetrievalStore.open(database_url)
    try:
        coll = _collection(store)
        for i in range(8):
            store.replace_document(coll.pk, _doc(f"d{i}", 3 + i % 3, acl=["group:a"] if i % 4 == 0 else None))
        manager = IndexManager(store, tmp_path / "live", k1=1.2, b=0.75, dense=FLAT)
        index = manager.current(coll.pk, coll.uid)
        assert (manager.full_builds, manager.updates) == (1, 0)
        writes = [
            lambda: store.replace_document(coll.pk, _doc("d8", 4)),  # add
            lambda: store.replace_document(coll.pk, _doc("d2", 6, acl=["user:b"])),  # replace
            lambda: store.update_document_fields(coll.pk, DocumentRow(  # access list + metadata only
                document_id="d3", content_sha256="", size_bytes=0, mime_type="text/plain", display_name="",
                source_uri="", metadata={"n": 1}, acl=["group:a"])),
            lambda: store.delete_document(coll.pk, "d5"),
            lambda: store.delete_document(coll.pk, "d0"),
            lambda: store.replace_document(coll.pk, _doc("d0", 2)),  # deleted, then back with new chunks
        ]
        for count, write in enumerate(writes, start=1):
            assert write()
            index = manager.current(coll.pk, coll.uid)
            assert (manager.full_builds, manager.updates) == (1, count)
            assert index.generation == store.generation(coll.pk)
            assert _ranked(index) == _ranked(_fresh(store, coll, tmp_path))
        assert manager.compactions >= 1 and manager.builds == 1 + len(writes)
        generation = index.generation
        assert manager.current(coll.pk, coll.uid) is index and manager.updates == len(writes)  # nothing changed
        # two writes between searches are applied together
        store.replace_document(coll.pk, _doc("d9", 2))
        store.delete_document(coll.pk, "d1")
        index = manager.current(coll.pk, coll.uid)
        assert index.generation == generation + 2 and manager.updates == len(writes) + 1
        assert _ranked(index) == _ranked(_fresh(store, coll, tmp_path))
    finally:
        store.close()


def test_a_restart_applies_what_changed_while_down(database_url: str, tmp_path: Path) -> None:
    store = RetrievalStore.open(database_url)
    try:
        coll = _collection(store)
        for i in range(6):
            store.replace_document(coll.pk, _doc(f"d{i}", 3))
        first = IndexManager(store, tmp_path / "idx", k1=1.2, b=0.75, dense=FLAT)
        first.current(coll.pk, coll.uid)
        store.delete_document(coll.pk, "d1")
        first.current(coll.pk, coll.uid)  # persisted with a tombstone
        store.replace_document(coll.pk, _doc("d6", 2))  # written while no replica searched
        store.update_document_fields(coll.pk, DocumentRow(
            document_id="d2", content_sha256="", size_bytes=0, mime_type="text/plain", display_name="",
            source_uri="", metadata={"n": 2}, acl=["user:b"]))
        second = IndexManager(store, tmp_path / "idx", k1=1.2, b=0.75, dense=FLAT)
        index = second.current(coll.pk, coll.uid)
        assert (second.full_builds, second.updates) == (0, 1)
        assert _ranked(index) == _ranked(_fresh(store, coll, tmp_path))
        third = IndexManager(store, tmp_path / "idx", k1=1.2, b=0.75, dense=FLAT)
        assert _ranked(third.current(coll.pk, coll.uid)) == _ranked(index) and third.builds == 0
        other_bm25 = IndexManager(store, tmp_path / "idx", k1=0.9, b=0.4, dense=FLAT)
        other_bm25.current(coll.pk, coll.uid)
        assert other_bm25.full_builds == 1  # persisted with other BM25 parameters: rebuilt
    finally:
        store.close()


def test_unknown_or_pruned_history_and_damaged_folders_rebuild(database_url: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = RetrievalStore.open(database_url)
    try:
        coll = _collection(store)
        for i in range(4):
            store.replace_document(coll.pk, _doc(f"d{i}", 2))
        manager = IndexManager(store, tmp_path / "idx", k1=1.2, b=0.75, dense=FLAT)
        manager.current(coll.pk, coll.uid)
        with store.engine.begin() as conn:  # a bump that names no document
            assert store._bump(conn, coll.pk)
        assert store.index_changes(coll.pk, store.generation(coll.pk) - 1) is None  # type: ignore[operator]
        manager.current(coll.pk, coll.uid)
        assert (manager.full_builds, manager.updates) == (2, 0)

        monkeypatch.setattr(storage, "INDEX_CHANGES_KEPT", 2)
        for i in range(3):  # more changes than the log keeps
            store.replace_document(coll.pk, _doc(f"e{i}", 1))
        assert _changes_rows(store, coll.pk) == 2
        manager.current(coll.pk, coll.uid)
        assert (manager.full_builds, manager.updates) == (3, 0)
        store.replace_document(coll.pk, _doc("e3", 1))
        index = manager.current(coll.pk, coll.uid)
        assert (manager.full_builds, manager.updates) == (3, 1)

        (manager.folder(coll.uid) / "dense.faiss").write_bytes(b"not a faiss index")
        restarted = IndexManager(store, tmp_path / "idx", k1=1.2, b=0.75, dense=FLAT)
        assert _ranked(restarted.current(coll.pk, coll.uid)) == _ranked(index)
        assert restarted.full_builds == 1
        assert CollectionIndex.load(manager.folder(coll.uid)) is not None  # and written back whole

        deleted = store.get_collection("t", "c")
        assert deleted is not None and store.delete_collection("t", "c", force=True, etag="")
        assert _changes_rows(store, deleted.pk) == 0  # the change log goes with the collection
    finally:
        store.close()


def test_growing_past_the_threshold_switches_to_hnsw_once(database_url: str, tmp_path: Path) -> None:
    config = DenseConfig(hnsw_min_chunks=30, m=16, ef_construction=64, ef_search=64, exact_below=0,
                         rebuild_tombstone_share=0.5)
    store = RetrievalStore.open(database_url)
    try:
        coll = _collection(store)
        manager = IndexManager(store, tmp_path / "idx", k1=1.2, b=0.75, dense=config)
        kinds = []
        for i in range(10):
            store.replace_document(coll.pk, _doc(f"d{i}", 4))
            kinds.append(manager.current(coll.pk, coll.uid).is_hnsw)
        assert kinds == [False] * 7 + [True] * 3  # 32 chunks at the 8th document
        assert manager.full_builds == 1 and manager.compactions == 1
        store.delete_document(coll.pk, "d4")
        index = manager.current(coll.pk, coll.uid)
        assert index.is_hnsw and index.tombstones == 4 and manager.compactions == 1
        everything = allowed_mask(index, frozenset(), ranking.compile_filters([]), filtered=False)
        assert int(everything.sum()) == 36 and -1 not in index.ids[everything].tolist()
        for position in np.flatnonzero(everything)[::6]:
            hits = index.dense_search(index.dense.reconstruct(int(position)), everything, 3)
            assert hits[0].position == position
    finally:
        store.close()
