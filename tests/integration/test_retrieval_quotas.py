"""Ingest quotas over real gRPC, SQLite and PostgreSQL: a document that would pass a per-collection
or per-tenant document or chunk quota fails with INGEST_QUOTA_EXCEEDED in its progress (before it is
embedded) and the stream goes on; a replacement counts only its difference; concurrent streams never
overshoot a quota."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.protos.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc
from llmo.retrieval.main import RunningRetrieval, start
from llmo.retrieval.quotas import QuotaExceeded, Quotas
from llmo.retrieval.settings import RetrievalSettings
from llmo.retrieval.storage import ChunkRow, CollectionRow, DocumentRow, RetrievalStore, Usage, now_us
from tests.integration.test_retrieval_service import A, B, _doc, _final, _ingest, _settings

WORDS = ("snow", "ice", "cold", "rain", "wind", "sun", "sea", "tree", "rock", "sand", "cloud", "storm")
CHUNK = 4  # FIXED chunks of 4 tokens, no overlap: each word below is one MiniLM token


def _text(chunks: int, seed: int = 0) -> str:
    """A text of exactly `chunks` chunks, different for each seed."""
    return " ".join(WORDS[(seed + i) % len(WORDS)] for i in range(CHUNK * chunks))


@asynccontextmanager
async def _service(database_url: str, data: Path, **quotas: int
                   ) -> AsyncIterator[tuple[RunningRetrieval, pb_grpc.RetrievalServiceStub]]:
    settings = _settings(database_url, data).model_copy(update=quotas)
    running = await start(settings, port=0, metrics=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            yield running, stub
    finally:
        await running.stop()


async def _create(stub: pb_grpc.RetrievalServiceStub, cid: str, meta: list[tuple[str, str]] = A) -> None:
    await stub.CreateCollection(pb.CreateCollectionRequest(collection_id=cid, collection=pb.Collection(
        chunking=pb.ChunkingConfig(chunk_size_tokens=CHUNK, chunk_overlap_tokens=0,
                                   strategy=pb.CHUNKING_STRATEGY_FIXED))), metadata=meta)


def _outcomes(responses: list[pb.IngestDocumentsResponse]) -> list[tuple[str, str]]:
    final = _final(responses)
    return [(pb.IngestStage.Name(final[i].stage).removeprefix("INGEST_STAGE_"), final[i].error_reason)
            for i in sorted(final)]


OK, OVER = ("INDEXED", ""), ("FAILED", "INGEST_QUOTA_EXCEEDED")


def test_the_quota_rule() -> None:
    quotas = Quotas(collection_documents=3, collection_chunks=10, tenant_chunks=15)
    fresh = Usage(collection_documents=2, collection_chunks=6, tenant_documents=9, tenant_chunks=11,
                  document_chunks=None)
    assert quotas.exceeded(fresh, 4) is None  # 3 documents, 10 chunks, 15 tenant chunks: at the limits
    assert "collection would hold 11 chunks; its quota is 10" in (quotas.exceeded(fresh, 5) or "")
    full = Usage(3, 6, 9, 11, None)
    assert "LLMO_RETRIEVAL_MAX_DOCUMENTS_PER_COLLECTION" in (quotas.exceeded(full, 1) or "")
    # a replacement counts only its difference: the document is already counted once
    replacing = Usage(2, 4, 9, 11, document_chunks=2)
    assert quotas.exceeded(replacing, 4) is None
    assert "tenant would hold 16 chunks" in (quotas.exceeded(replacing, 5) or "")
    # over a limit lowered since: a replacement that does not grow passes, one that grows does not
    over = Usage(5, 20, 9, 30, document_chunks=4)
    assert quotas.exceeded(over, 4) is None and quotas.exceeded(over, 1) is None
    assert quotas.exceeded(over, 5) is not None
    assert not Quotas().enabled and Quotas.of(_settings("", Path("."))) == Quotas()


async def test_document_and_chunk_quotas_per_collection(database_url: str, tmp_path: Path) -> None:
    async with _service(database_url, tmp_path, max_documents_per_collection=3, max_chunks_per_collection=8
                        ) as (running, stub):
        await _create(stub, "q")
        await _create(stub, "other")
        embedded: list[int] = []
        encode = running.servicer.embedder.encode

        def counting(texts: list[str]) -> Any:
            embedded.append(len(texts))
            return encode(texts)

        running.servicer.embedder.encode = counting  # type: ignore[method-assign]
        replies = await _ingest(stub, "q", [_doc("a", _text(3)), _doc("b", _text(3, 1)), _doc("c", _text(3, 2)),
                                            _doc("d", _text(1, 3)), _doc("e", _text(1, 4))])
        # c would make 9 chunks, then d and e would be a fourth document; the stream goes on after each
        assert _outcomes(replies) == [OK, OK, OVER, OK, OVER]
        final = _final(replies)
        assert final[2].document == "collections/q/documents/c" and "9 chunks; its quota is 8" in final[2].error_message
        assert "LLMO_RETRIEVAL_MAX_DOCUMENTS_PER_COLLECTION" in final[4].error_message
        summary = replies[-1].summary
        assert (summary.documents_indexed, summary.documents_failed, summary.chunks_indexed) == (3, 2, 7)
        assert embedded == [3, 3, 1]  # refused documents were never embedded
        # a replacement counts its difference only: a (3 chunks) may become 4, not 5
        assert _outcomes(await _ingest(stub, "q", [_doc("a", _text(5, 5)), _doc("a", _text(4, 6))])) == [OVER, OK]
        # metadata / access-list changes and unchanged documents count nothing
        assert _outcomes(await _ingest(stub, "q", [_doc("b", _text(3, 1), acl=["user:x"]), _doc("d", _text(1, 3))])
                         ) == [OK, ("SKIPPED", "")]
        # the quota is per collection, and deleting frees it
        assert _outcomes(await _ingest(stub, "other", [_doc("x", _text(8))])) == [OK]
        await stub.DeleteDocument(pb.DeleteDocumentRequest(name="collections/q/documents/b"), metadata=A)
        assert _outcomes(await _ingest(stub, "q", [_doc("e", _text(3, 7))])) == [OK]
        got = (await stub.GetCollection(pb.GetCollectionRequest(name="collections/q"), metadata=A)).collection
        assert (got.document_count, got.chunk_count) == (3, 8)


async def test_quotas_per_tenant_span_collections_and_only_that_tenant(database_url: str, tmp_path: Path) -> None:
    async with _service(database_url, tmp_path, max_documents_per_tenant=3, max_chunks_per_tenant=5) as (_, stub):
        for cid in ("one", "two"):
            await _create(stub, cid)
        await _create(stub, "one", B)
        assert _outcomes(await _ingest(stub, "one", [_doc("a", _text(2)), _doc("b", _text(2, 1))])) == [OK, OK]
        replies = await _ingest(stub, "two", [_doc("c", _text(2, 2)), _doc("c", _text(1, 3)), _doc("d", _text(1, 4))])
        assert _outcomes(replies) == [OVER, OK, OVER]
        assert "tenant would hold 6 chunks" in _final(replies)[0].error_message
        assert "tenant would hold 4 documents" in _final(replies)[2].error_message
        # tenantA is full; tenantB's usage is its own
        replies_b = await _ingest(stub, "one", [_doc("z", _text(4)), _doc("y", _text(1, 1)), _doc("w", _text(1, 2))],
                                  B)
        assert _outcomes(replies_b) == [OK, OK, OVER]


async def test_concurrent_streams_never_overshoot(database_url: str, tmp_path: Path) -> None:
    """Every document passes the check before embedding while the others are in flight; the check in
    the write transaction keeps the totals at the quotas."""
    async with _service(database_url, tmp_path, max_documents_per_collection=4, max_documents_per_tenant=6
                        ) as (_, stub):
        for cid in ("p", "q"):
            await _create(stub, cid)
        streams = [_ingest(stub, cid, [_doc(f"{cid}{s}-{i}", _text(1, i)) for i in range(4)])
                   for cid in ("p", "q") for s in range(2)]
        outcomes = [o for replies in await asyncio.gather(*streams) for o in _outcomes(replies)]
        assert outcomes.count(OK) == 6 and outcomes.count(OVER) == 10
        counts = [(await stub.GetCollection(pb.GetCollectionRequest(name=f"collections/{cid}"), metadata=A)
                   ).collection.document_count for cid in ("p", "q")]
        assert sum(counts) == 6 and max(counts) <= 4, counts


def test_negative_quotas_are_refused() -> None:
    with pytest.raises(ValidationError):
        RetrievalSettings(max_chunks_per_tenant=-1)


def test_the_tenant_lock_serialises_quota_checked_writes_across_collections(database_url: str) -> None:
    """PostgreSQL: a write into another collection of the tenant waits on the tenant's advisory lock
    while the first one holds it, then sees it and is refused (without the lock both would pass)."""
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite serialises every write: no tenant lock is taken")
    store = RetrievalStore.open(database_url)
    try:
        stamp = now_us()
        colls = [store.create_collection(CollectionRow(
            pk=0, uid=uuid.uuid4().hex, tenant="t", collection_id=cid, display_name="", description="", labels={},
            embedding_model="all-MiniLM-L6-v2", chunk_size=4, chunk_overlap=0, strategy=1, etag="e",
            create_request_id="", generation=1, create_us=stamp, update_us=stamp)) for cid in ("p", "q")]
        quotas = Quotas(tenant_documents=1)
        held, release = threading.Event(), threading.Event()
        first_guard = quotas.guard(store, "t", colls[0].pk, "a", 1)
        assert first_guard is not None

        def first_check(conn: Any) -> None:
            first_guard(conn)
            held.set()
            release.wait(60)

        outcomes: dict[str, object] = {}

        def write(key: str, pk: int, did: str, check: Any) -> None:
            try:
                outcomes[key] = store.replace_document(pk, _row(did), check)
            except QuotaExceeded as error:
                outcomes[key] = error

        first = threading.Thread(target=write, args=("first", colls[0].pk, "a", first_check))
        first.start()
        assert held.wait(60)
        second = threading.Thread(target=write, args=("second", colls[1].pk, "b",
                                                      quotas.guard(store, "t", colls[1].pk, "b", 1)))
        second.start()
        waiting = sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        with store.engine.connect() as conn:
            while second.is_alive() and not conn.execute(waiting).scalar():
                time.sleep(0.01)
        release.set()
        first.join(60)
        second.join(60)
        assert outcomes["first"] == 1 and isinstance(outcomes["second"], QuotaExceeded), outcomes
    finally:
        store.close()


def _row(did: str) -> DocumentRow:
    return DocumentRow(document_id=did, content_sha256=uuid.uuid4().hex * 2, size_bytes=4, mime_type="text/plain",
                       display_name="", source_uri="", metadata={}, acl=[],
                       chunks=[ChunkRow(idx=0, text="snow", heading_path=[], start_offset=0, end_offset=4,
                                        token_count=1, embedding=b"\0" * 1536)])
