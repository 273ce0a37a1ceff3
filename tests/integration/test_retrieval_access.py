"""UpdateDocumentAccess over real gRPC, SQLite and PostgreSQL (local backend; the pgvector backend
runs the same canary in test_retrieval_pgvector.py) and the real MiniLM model: the access-update
canary (after a revoke the document never surfaces in results, snippets, counts, graph evidence or
compressed context, exactly as if the collection never held it; after a grant it is back), the
bounds and errors of the RPC, tenancy, and its document_ingested event."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmo.core.errors import error_info
from llmo.core.natsd import NatsServer
from llmo.protos.events.v1 import events_pb2
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.protos.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc
from llmo.retrieval.main import RunningRetrieval, start
from llmo.retrieval.settings import RetrievalSettings
from tests.integration.test_retrieval_service import A, B, _code, _doc, _docs_of, _ingest, _settings
from tests.unit.retrieval.corpus import PLAIN

GRAPH = {
    "ada": "We know Ada Lovelace worked with Charles Babbage on the Analytical Engine. Ada Lovelace wrote the "
           "first program.",
    "babbage": "In London, Charles Babbage designed the Difference Engine.",
    "somerville": "We know Ada Lovelace studied mathematics with Mary Somerville.",
}
SECRET = ("We know Ada Lovelace secretly advised Project Nightingale with Lord Byron. The Nightingale merger "
          "price is ninety million.")
LEAKS = ("Nightingale", "nightingale", "ninety million", "Byron", "advised", "merger")
QUERIES = {
    pb.SEARCH_MODE_SPARSE: "nightingale merger price",
    pb.SEARCH_MODE_DENSE: "what is the price of the nightingale merger",
    pb.SEARCH_MODE_HYBRID: "nightingale merger price ninety million",
    pb.SEARCH_MODE_KNOWLEDGE_GRAPH: "Lord Byron and Ada Lovelace",
}
ALICE = pb.Principal(subject="user:alice", groups=["group:eng"])
CEO = pb.Principal(subject="user:ceo")
SECRET_NAME = "collections/acl/documents/secret"


@asynccontextmanager
async def _service(settings: RetrievalSettings) -> AsyncIterator[tuple[RunningRetrieval, pb_grpc.RetrievalServiceStub]]:
    running = await start(settings, port=0, metrics=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield running, pb_grpc.RetrievalServiceStub(channel)
    finally:
        await running.stop()


async def _create_graph(stub: pb_grpc.RetrievalServiceStub, cid: str, meta: list[tuple[str, str]] = A) -> None:
    await stub.CreateCollection(pb.CreateCollectionRequest(collection_id=cid, collection=pb.Collection(
        knowledge_graph_enabled=True)), metadata=meta)


async def _update(stub: pb_grpc.RetrievalServiceStub, name: str, acl: list[str], *, expected: int = 0,
                  meta: list[tuple[str, str]] = A) -> pb.Document:
    reply = await stub.UpdateDocumentAccess(pb.UpdateDocumentAccessRequest(
        name=name, access_control=pb.AccessControl(allowed_principals=acl), expected_version=expected), metadata=meta)
    return reply.document


async def _search(stub: pb_grpc.RetrievalServiceStub, cid: str, mode: int, principal: pb.Principal
                  ) -> pb.SearchResponse:
    return await stub.Search(pb.SearchRequest(
        collection=f"collections/{cid}", query=QUERIES[mode], mode=mode, top_k=100, principal=principal,  # type: ignore[arg-type]
        compression=pb.CompressionOptions(enabled=True), knowledge_graph=pb.KnowledgeGraphOptions(max_hops=2)),
        metadata=A)


def _observed(reply: pb.SearchResponse) -> tuple[Any, ...]:
    """Everything a caller can see of a search but latencies and scores."""
    return (_docs_of(reply), [r.chunk.text for r in reply.results], [r.compressed_text for r in reply.results],
            [list(r.matched_entities) for r in reply.results],
            [[(x.subject, x.predicate, x.object) for x in r.relations] for r in reply.results],
            reply.compressed_context, reply.candidates_considered, [(s.stage, s.items) for s in reply.stages])


async def _assert_hidden(stub: pb_grpc.RetrievalServiceStub, principal: pb.Principal, *, exact_scores: bool) -> None:
    for mode in QUERIES:
        got, want = await _search(stub, "acl", mode, principal), await _search(stub, "control", mode, principal)
        assert _observed(got) == _observed(want), (mode, principal)
        if exact_scores or mode in (pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_KNOWLEDGE_GRAPH):
            # (BM25's IDF on the local backend counts the hidden document's terms: see the README)
            assert [r.score for r in got.results] == pytest.approx([r.score for r in want.results]), mode
        leaked = [word for word in LEAKS if word in str(got)]
        assert not leaked, (mode, principal, leaked)


async def _assert_visible(stub: pb_grpc.RetrievalServiceStub, principal: pb.Principal) -> None:
    for mode in QUERIES:
        reply = await _search(stub, "acl", mode, principal)
        assert "secret" in _docs_of(reply), (mode, principal)
        if mode != pb.SEARCH_MODE_KNOWLEDGE_GRAPH:
            assert _docs_of(reply)[0] == "secret", (mode, principal)
            assert "Nightingale" in reply.compressed_context, mode
        else:
            secret = reply.results[_docs_of(reply).index("secret")]
            assert "Lord Byron" in secret.matched_entities and any(
                r.object == "Project Nightingale" for r in secret.relations), secret


async def access_canary(settings: RetrievalSettings, *, exact_scores: bool) -> None:
    """The secret document is the best match of every query; revoking and granting it through
    UpdateDocumentAccess applies at the next search of an index built before the change."""
    async with _service(settings) as (_, stub):
        for cid in ("acl", "control"):
            await _create_graph(stub, cid)
        public = [_doc(f"pub{i}", t) for i, t in enumerate(PLAIN)] + [_doc(d, t) for d, t in GRAPH.items()]
        await _ingest(stub, "acl", [*public[:3], _doc("secret", SECRET, acl=["group:eng"]), *public[3:]])
        await _ingest(stub, "control", public)
        before = (await stub.GetDocument(pb.GetDocumentRequest(name=SECRET_NAME, view=pb.DOCUMENT_VIEW_FULL),
                                         metadata=A)).document
        await _assert_visible(stub, ALICE)  # also builds and caches the indexes before the change

        revoked = await _update(stub, SECRET_NAME, ["user:ceo"], expected=1)
        assert (revoked.version, list(revoked.access_control.allowed_principals)) == (2, ["user:ceo"])
        after = (await stub.GetDocument(pb.GetDocumentRequest(name=SECRET_NAME, view=pb.DOCUMENT_VIEW_FULL),
                                        metadata=A)).document
        assert (after.content_sha256, after.chunk_count, [c.text for c in after.chunks]) == (
            before.content_sha256, before.chunk_count, [c.text for c in before.chunks])
        for principal in (ALICE, pb.Principal(), pb.Principal(subject="user:ceo-assistant", groups=["group:boards"])):
            await _assert_hidden(stub, principal, exact_scores=exact_scores)
        await _assert_visible(stub, CEO)

        granted = await _update(stub, SECRET_NAME, ["user:ceo", "group:eng"], expected=2)
        assert granted.version == 3
        await _assert_visible(stub, ALICE)
        await _assert_visible(stub, CEO)
        await _assert_hidden(stub, pb.Principal(), exact_scores=exact_scores)

        await _update(stub, SECRET_NAME, [])  # empty: every principal of the tenant, anonymous included
        await _assert_visible(stub, pb.Principal())
        await _update(stub, SECRET_NAME, ["user:ceo"])
        await _assert_hidden(stub, pb.Principal(), exact_scores=exact_scores)
        await _assert_hidden(stub, ALICE, exact_scores=exact_scores)
        final = (await stub.GetDocument(pb.GetDocumentRequest(name=SECRET_NAME), metadata=A)).document
        assert (final.version, list(final.access_control.allowed_principals)) == (5, ["user:ceo"])


async def test_access_update_canary(database_url: str, tmp_path: Path) -> None:
    await access_canary(_settings(database_url, tmp_path), exact_scores=False)


async def _reason(call: Any) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    info = error_info(raised.value)
    assert info is not None and info.domain == "llmo.retrieval", raised.value
    return raised.value.code(), info.reason, dict(info.metadata)


async def test_bounds_errors_versions_and_tenancy(database_url: str, tmp_path: Path) -> None:
    async with _service(_settings(database_url, tmp_path)) as (running, stub):
        await stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c"), metadata=A)
        await _ingest(stub, "c", [_doc("d", PLAIN[1], acl=["group:eng"])])
        name = "collections/c/documents/d"
        request = pb.UpdateDocumentAccessRequest
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        for bad in ("collections/c", "collections/c/documents/D", "c/d", ""):
            assert (await _reason(stub.UpdateDocumentAccess(request(
                name=bad, access_control=pb.AccessControl()), metadata=A)))[:2] == (invalid, "INVALID_NAME")
        code, reason, meta = await _reason(stub.UpdateDocumentAccess(request(name=name), metadata=A))
        assert (code, reason, meta["field"]) == (invalid, "INVALID_ACCESS_CONTROL", "access_control")
        for acl in (["user:x"] * 257, ["u" * 129], ["user alice"], [""], ["group:eng", "bad\x00"]):
            code, reason, meta = await _reason(_update(stub, name, acl))
            assert (code, reason, meta["max_entries"], meta["max_length"]) == (
                invalid, "INVALID_ACCESS_CONTROL", "256", "128"), acl
        assert (await _reason(_update(stub, name, ["user:x"], expected=-1)))[:2] == (invalid, "INVALID_EXPECTED_VERSION")
        for missing in ("collections/nope/documents/d", "collections/c/documents/nope"):
            reason = "COLLECTION_NOT_FOUND" if "nope/" in missing else "DOCUMENT_NOT_FOUND"
            assert (await _reason(_update(stub, missing, ["user:x"])))[:2] == (grpc.StatusCode.NOT_FOUND, reason)
        # another tenant's document reads as a missing one, even with a collection of the same id
        assert (await _reason(_update(stub, name, ["user:b"], meta=B)))[:2] == (
            grpc.StatusCode.NOT_FOUND, "COLLECTION_NOT_FOUND")
        await stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c"), metadata=B)
        assert (await _reason(_update(stub, name, ["user:b"], meta=B)))[:2] == (
            grpc.StatusCode.NOT_FOUND, "DOCUMENT_NOT_FOUND")
        doc = (await stub.GetDocument(pb.GetDocumentRequest(name=name), metadata=A)).document
        assert (doc.version, list(doc.access_control.allowed_principals)) == (1, ["group:eng"])
        coll = running.store.get_collection("tenantA", "c")
        assert coll is not None
        generation = coll.generation

        # the bounds are those of ingestion: 256 entries of 128 characters are accepted
        widest = [f"user:{i:03d}" + "x" * 120 for i in range(256)]
        assert all(len(p) == 128 for p in widest)
        assert (await _update(stub, name, widest, expected=1)).version == 2
        assert await _code(_update(stub, name, ["user:x"], expected=1)) == (grpc.StatusCode.ABORTED, "VERSION_MISMATCH")
        # the same list again writes nothing: same version, no bump
        unchanged = await _update(stub, name, widest)
        assert unchanged.version == 2 and running.store.generation(coll.pk) == generation + 1
        restored = await _update(stub, name, ["group:eng"], expected=2)
        assert restored.version == 3 and running.store.generation(coll.pk) == generation + 2
        # the same access list sent by re-ingesting the same content is then unchanged: SKIPPED
        again = await _ingest(stub, "c", [_doc("d", PLAIN[1], acl=["group:eng"])])
        assert [r.progress.stage for r in again if r.HasField("progress")][-1] == pb.INGEST_STAGE_SKIPPED


async def test_an_access_change_publishes_document_ingested(nats_server: NatsServer, tmp_path: Path) -> None:
    import nats

    settings = _settings(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, nats_server.url)
    nc = await nats.connect(nats_server.url)
    try:
        async with _service(settings) as (running, stub):
            await stub.CreateCollection(pb.CreateCollectionRequest(collection_id="ev"), metadata=A)
            await _ingest(stub, "ev", [_doc("a", PLAIN[0])])
            name = "collections/ev/documents/a"
            await _update(stub, name, ["user:x"])
            await _update(stub, name, ["user:x"])  # unchanged: no event
            assert running.publisher is not None and await running.publisher.flush(20)
            coll = running.store.get_collection("tenantA", "ev")
            assert coll is not None
        sub = await nc.jetstream().pull_subscribe("llmo.retrieval.v1.document_ingested", durable="access")
        events = [events_pb2.DocumentIngested.FromString(m.data) for m in await sub.fetch(5, timeout=5)]
        assert [(e.event_id, e.document, e.chunks, e.tenant) for e in events] == [
            (f"retrieval-ingested:{coll.uid}:{name}:v1", name, 1, "tenantA"),
            (f"retrieval-ingested:{coll.uid}:{name}:v2", name, 1, "tenantA")]
    finally:
        await nc.close()
