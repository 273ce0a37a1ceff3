"""The retrieval store of record on SQLite and PostgreSQL: a replacement that fails half-way
(here: a chunk row the database refuses, after the old rows were deleted and the new document
inserted) leaves the previous version whole, and the indexes' generation untouched."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from llmo.retrieval.storage import ChunkRow, CollectionRow, DocumentRow, RetrievalStore, now_us


def _doc(did: str, texts: list[str], idx: list[int] | None = None) -> DocumentRow:
    return DocumentRow(document_id=did, content_sha256=uuid.uuid4().hex * 2, size_bytes=10, mime_type="text/plain",
                       display_name="", source_uri="", metadata={"v": len(texts)}, acl=["user:ann"],
                       chunks=[ChunkRow(idx=i, text=t, heading_path=["H"], start_offset=0, end_offset=len(t),
                                        token_count=1, embedding=b"\0" * 1536)
                               for i, t in zip(idx or range(len(texts)), texts, strict=True)])


def test_failed_replacement_leaves_the_previous_version_whole(database_url: str) -> None:
    store = RetrievalStore.open(database_url)
    try:
        stamp = now_us()
        coll = store.create_collection(CollectionRow(
            pk=0, uid=uuid.uuid4().hex, tenant="t", collection_id="c", display_name="", description="", labels={},
            embedding_model="all-MiniLM-L6-v2", chunk_size=256, chunk_overlap=32, strategy=3, etag="e",
            create_request_id="", generation=1, create_us=stamp, update_us=stamp))
        assert store.replace_document(coll.pk, _doc("d", ["old one", "old two"])) == 1
        generation = store.generation(coll.pk)
        with pytest.raises(sa.exc.IntegrityError):  # two chunks at position 0: refused at insert
            store.replace_document(coll.pk, _doc("d", ["new one", "new two", "new three"], idx=[0, 1, 0]))
        kept = store.get_document(coll.pk, "d", with_chunks=True)
        assert kept is not None and kept.version == 1 and kept.metadata == {"v": 2}
        assert [c.text for c in kept.chunks] == ["old one", "old two"]
        assert store.generation(coll.pk) == generation
        indexed_generation, chunks = store.indexed_chunks(coll.pk)
        assert indexed_generation == generation and [c.text for c in chunks] == ["old one", "old two"]
        assert store.replace_document(coll.pk, _doc("d", ["new one"])) == 2
        assert [c.text for c in store.indexed_chunks(coll.pk)[1]] == ["new one"]
        assert store.delete_document(coll.pk, "d") and store.indexed_chunks(coll.pk)[1] == []
    finally:
        store.close()
