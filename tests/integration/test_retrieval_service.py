"""The retrieval service over real gRPC, a real nats-server, SQLite and PostgreSQL, and the real
MiniLM model (loaded once per process): collections, ingestion of every format, the three search
modes, metadata filters, access control before top-k (canary), events and index rebuilds."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2

from llmo.core.errors import error_info
from llmo.core.natsd import NatsServer
from llmo.core.settings import PlatformSettings
from llmo.protos.events.v1 import events_pb2
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.protos.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc
from llmo.retrieval.main import RunningRetrieval, start
from llmo.retrieval.settings import RetrievalSettings
from tests.unit.retrieval.corpus import HTML, MARKDOWN, PLAIN, pdf_bytes

KEYS = {"ka": "tenantA", "kb": "tenantB"}
A, B = [("authorization", "Bearer ka")], [("authorization", "Bearer kb")]


@dataclass
class Harness:
    running: RunningRetrieval
    stub: pb_grpc.RetrievalServiceStub
    settings: RetrievalSettings


def _settings(database_url: str, data: Path, nats_url: str = "nats://127.0.0.1:1") -> RetrievalSettings:
    return RetrievalSettings(database_url=database_url, metrics_port=-1, min_candidates=10, platform=PlatformSettings(
        nats_url=nats_url, data_dir=data, drain_seconds=0.5, api_keys=KEYS))


@pytest.fixture
async def svc(database_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    settings = _settings(database_url, tmp_path)
    running = await start(settings, port=0, metrics=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield Harness(running, pb_grpc.RetrievalServiceStub(channel), settings)
    finally:
        await channel.close()
        await running.stop()


async def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    info = error_info(raised.value)
    return raised.value.code(), info.reason if info else ""


async def _create(stub: pb_grpc.RetrievalServiceStub, cid: str, meta: list[tuple[str, str]] = A,
                  **chunking: Any) -> pb.Collection:
    reply = await stub.CreateCollection(pb.CreateCollectionRequest(
        collection_id=cid, collection=pb.Collection(display_name=cid, chunking=pb.ChunkingConfig(**chunking))),
        metadata=meta)
    return reply.collection


def _doc(did: str, text: str = "", *, content: bytes | None = None, mime: str = "", acl: Iterable[str] = (),
         **metadata: Any) -> pb.DocumentInput:
    doc = pb.DocumentInput(document_id=did, mime_type=mime, access_control=pb.AccessControl(allowed_principals=acl))
    if content is not None:
        doc.content = content
    else:
        doc.text = text
    doc.metadata.update(metadata)
    return doc


async def _ingest(stub: pb_grpc.RetrievalServiceStub, cid: str, docs: list[pb.DocumentInput],
                  meta: list[tuple[str, str]] = A, reindex: bool = False) -> list[pb.IngestDocumentsResponse]:
    async def requests() -> AsyncIterator[pb.IngestDocumentsRequest]:
        yield pb.IngestDocumentsRequest(config=pb.IngestConfig(collection=f"collections/{cid}",
                                                               reindex_unchanged=reindex))
        for doc in docs:
            yield pb.IngestDocumentsRequest(document=doc)

    return [r async for r in stub.IngestDocuments(requests(), metadata=meta)]


def _final(responses: list[pb.IngestDocumentsResponse]) -> dict[int, pb.DocumentProgress]:
    return {r.progress.index: r.progress for r in responses if r.HasField("progress")}


async def _search(stub: pb_grpc.RetrievalServiceStub, cid: str, query: str, meta: list[tuple[str, str]] = A,
                  **kw: Any) -> pb.SearchResponse:
    return await stub.Search(pb.SearchRequest(collection=f"collections/{cid}", query=query, **kw), metadata=meta)


def _docs_of(reply: pb.SearchResponse) -> list[str]:
    return [r.chunk.document.rsplit("/", 1)[1] for r in reply.results]


async def test_collections_are_tenant_scoped_paginated_and_guarded(svc: Harness) -> None:
    stub = svc.stub
    for cid in ("c1", "c2", "c3"):
        await _create(stub, cid)
    assert await _code(_create(stub, "c1")) == (grpc.StatusCode.ALREADY_EXISTS, "COLLECTION_ALREADY_EXISTS")
    # the same id in another tenant is another collection
    other = await _create(stub, "c1", B)
    assert other.tenant == "tenantB"
    page1 = await stub.ListCollections(pb.ListCollectionsRequest(page_size=2), metadata=A)
    assert [c.name for c in page1.collections] == ["collections/c1", "collections/c2"] and page1.next_page_token
    page2 = await stub.ListCollections(pb.ListCollectionsRequest(page_size=2, page_token=page1.next_page_token),
                                       metadata=A)
    assert [c.name for c in page2.collections] == ["collections/c3"] and not page2.next_page_token
    listed_b = await stub.ListCollections(pb.ListCollectionsRequest(), metadata=B)
    assert [c.name for c in listed_b.collections] == ["collections/c1"]
    # foreign and missing read the same
    for name in ("collections/c2", "collections/nope"):
        assert await _code(stub.GetCollection(pb.GetCollectionRequest(name=name), metadata=B)) == (
            grpc.StatusCode.NOT_FOUND, "COLLECTION_NOT_FOUND")
        assert await _code(_search(stub, name.split("/")[1], "x", B)) == (
            grpc.StatusCode.NOT_FOUND, "COLLECTION_NOT_FOUND")
    got = (await stub.GetCollection(pb.GetCollectionRequest(name="collections/c2"), metadata=A)).collection
    assert got.embedding_model == "all-MiniLM-L6-v2" and got.embedding_dimensions == 384
    assert (got.chunking.chunk_size_tokens, got.chunking.chunk_overlap_tokens) == (256, 32)
    updated = (await stub.UpdateCollection(pb.UpdateCollectionRequest(
        collection=pb.Collection(name="collections/c2", description="new", etag=got.etag),
        update_mask=field_mask_pb2.FieldMask(paths=["description"])), metadata=A)).collection
    assert updated.description == "new" and updated.etag != got.etag and updated.display_name == "c2"
    assert await _code(stub.UpdateCollection(pb.UpdateCollectionRequest(
        collection=pb.Collection(name="collections/c2", description="stale", etag=got.etag)), metadata=A)) == (
        grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    await _ingest(stub, "c2", [_doc("d1", PLAIN[0])])
    assert await _code(stub.UpdateCollection(pb.UpdateCollectionRequest(
        collection=pb.Collection(name="collections/c2", chunking=pb.ChunkingConfig(chunk_size_tokens=64)),
        update_mask=field_mask_pb2.FieldMask(paths=["chunking"])), metadata=A)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "COLLECTION_NOT_EMPTY")
    assert await _code(stub.DeleteCollection(pb.DeleteCollectionRequest(name="collections/c2"), metadata=A)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "COLLECTION_NOT_EMPTY")
    assert await _code(stub.DeleteCollection(pb.DeleteCollectionRequest(name="collections/c2", force=True),
                                             metadata=B)) == (grpc.StatusCode.NOT_FOUND, "COLLECTION_NOT_FOUND")
    await stub.DeleteCollection(pb.DeleteCollectionRequest(name="collections/c2", force=True), metadata=A)
    assert await _code(stub.GetCollection(pb.GetCollectionRequest(name="collections/c2"), metadata=A)) == (
        grpc.StatusCode.NOT_FOUND, "COLLECTION_NOT_FOUND")


async def test_ingest_every_format_dedupe_replace_and_per_document_errors(svc: Harness) -> None:
    stub = svc.stub
    await _create(stub, "kb", chunk_size_tokens=48, chunk_overlap_tokens=8, strategy=pb.CHUNKING_STRATEGY_HEADING)
    responses = await _ingest(stub, "kb", [
        _doc("manual", MARKDOWN, mime="text/markdown"),
        _doc("station", content=HTML.encode(), mime="text/html"),
        _doc("glacier", content=pdf_bytes("Glaciers carve deep valleys over thousands of years")),
        _doc("broken", content=b"%PDF-1.4\nthis is not a pdf at all"),
        _doc("", ""),
        _doc("Bad_Id", "text"),
        _doc("volcano", PLAIN[0]),
    ])
    final = _final(responses)
    assert [final[i].stage for i in range(7)] == [
        pb.INGEST_STAGE_INDEXED, pb.INGEST_STAGE_INDEXED, pb.INGEST_STAGE_INDEXED, pb.INGEST_STAGE_FAILED,
        pb.INGEST_STAGE_FAILED, pb.INGEST_STAGE_FAILED, pb.INGEST_STAGE_INDEXED]
    assert [final[i].error_reason for i in (3, 4, 5)] == ["DECODE_FAILED", "EMPTY_CONTENT", "INVALID_DOCUMENT_ID"]
    summary = responses[-1].summary
    assert (summary.documents_received, summary.documents_indexed, summary.documents_failed) == (7, 4, 3)
    stages = [r.progress.stage for r in responses if r.HasField("progress") and r.progress.index == 0]
    assert stages == [pb.INGEST_STAGE_RECEIVED, pb.INGEST_STAGE_CHUNKED, pb.INGEST_STAGE_EMBEDDED,
                      pb.INGEST_STAGE_INDEXED]

    manual = (await stub.GetDocument(pb.GetDocumentRequest(name="collections/kb/documents/manual",
                                                           view=pb.DOCUMENT_VIEW_FULL), metadata=A)).document
    assert manual.version == 1 and manual.mime_type == "text/markdown" and len(manual.content_sha256) == 64
    paths = [tuple(c.heading_path) for c in manual.chunks]
    assert ("Widget manual", "Calibration") in paths and ("Widget manual", "Installation") in paths
    for chunk in manual.chunks:  # heading-aware: a chunk never spans two sections
        assert MARKDOWN[chunk.start_offset:chunk.end_offset] == chunk.text
        assert chunk.text.count("## ") <= 1 and (chunk.text.count("## ") == 0 or chunk.text.startswith("## "))
    station = (await stub.GetDocument(pb.GetDocumentRequest(name="collections/kb/documents/station",
                                                            view=pb.DOCUMENT_VIEW_FULL), metadata=A)).document
    station_text = " ".join(c.text for c in station.chunks)
    assert "lithium batteries" in station_text and "cookie" not in station_text and "footer" not in station_text

    again = _final(await _ingest(stub, "kb", [_doc("volcano", PLAIN[0])]))
    assert again[0].stage == pb.INGEST_STAGE_SKIPPED
    replaced = _final(await _ingest(stub, "kb", [_doc("volcano", PLAIN[1])]))
    assert replaced[0].stage == pb.INGEST_STAGE_INDEXED
    volcano = (await stub.GetDocument(pb.GetDocumentRequest(name="collections/kb/documents/volcano",
                                                            view=pb.DOCUMENT_VIEW_FULL), metadata=A)).document
    assert volcano.version == 2 and [c.text for c in volcano.chunks] == [PLAIN[1]]
    assert _docs_of(await _search(stub, "kb", "magma erupt volcano", mode=pb.SEARCH_MODE_SPARSE)) == []
    assert _docs_of(await _search(stub, "kb", "flightless penguins", mode=pb.SEARCH_MODE_SPARSE)) == ["volcano"]

    await stub.DeleteDocument(pb.DeleteDocumentRequest(name="collections/kb/documents/volcano"), metadata=A)
    for mode in (pb.SEARCH_MODE_SPARSE, pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_HYBRID):
        assert "volcano" not in _docs_of(await _search(stub, "kb", "flightless penguins", mode=mode, top_k=100))
    listed = await stub.ListDocuments(pb.ListDocumentsRequest(parent="collections/kb", page_size=2), metadata=A)
    rest = await stub.ListDocuments(pb.ListDocumentsRequest(parent="collections/kb", page_size=2,
                                                            page_token=listed.next_page_token), metadata=A)
    assert [d.name.rsplit("/", 1)[1] for d in [*listed.documents, *rest.documents]] == ["glacier", "manual", "station"]


async def test_search_modes_fusion_and_filters(svc: Harness) -> None:
    stub = svc.stub
    await _create(stub, "mix")
    years = [2019, 2021, 2023, 2024]
    await _ingest(stub, "mix", [_doc(f"p{i}", text, year=years[i], tags=["science" if i != 2 else "food"])
                                for i, text in enumerate(PLAIN)])
    sparse = await _search(stub, "mix", "magma crust eruption", mode=pb.SEARCH_MODE_SPARSE)
    assert _docs_of(sparse)[0] == "p0" and sparse.results[0].sparse_rank == 1 and sparse.results[0].dense_rank == 0
    dense = await _search(stub, "mix", "birds of Antarctica that cannot fly", mode=pb.SEARCH_MODE_DENSE)
    assert _docs_of(dense)[0] == "p1" and 0 < dense.results[0].dense_score <= 1.0
    for method in (pb.FUSION_METHOD_RRF, pb.FUSION_METHOD_CONVEX):
        hybrid = await _search(stub, "mix", "how plants turn sunlight into sugar",
                               fusion=pb.FusionOptions(method=method, rrf_k=10))
        assert hybrid.mode == pb.SEARCH_MODE_HYBRID and _docs_of(hybrid)[0] == "p3", (method, hybrid)
        scores = [r.score for r in hybrid.results]
        assert scores == sorted(scores, reverse=True)
    top = (await _search(stub, "mix", "how plants turn sunlight into sugar", fusion=pb.FusionOptions(rrf_k=10)
                         )).results[0]
    assert top.score == pytest.approx(sum(1 / (10 + r) for r in (top.dense_rank, top.sparse_rank) if r))

    def num(v: float) -> struct_pb2.Value:
        return struct_pb2.Value(number_value=v)

    newer = await _search(stub, "mix", "earth birds cake plants", top_k=10, filters=[
        pb.MetadataFilter(key="year", operator=pb.FILTER_OPERATOR_GREATER_THAN, values=[num(2020)]),
        pb.MetadataFilter(key="tags", operator=pb.FILTER_OPERATOR_IN, values=[struct_pb2.Value(string_value="science")]),
    ])
    assert sorted(set(_docs_of(newer))) == ["p1", "p3"] and newer.candidates_considered == 2
    bad = pb.MetadataFilter(key="year", operator=pb.FILTER_OPERATOR_LESS_THAN, values=[num(1), num(2)])
    assert await _code(_search(stub, "mix", "x", filters=[bad])) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FILTER")


async def test_unsupported_options_and_bad_queries_are_refused_clearly(svc: Harness) -> None:
    stub = svc.stub
    await _create(stub, "q")
    # this service has no generator configured: the stages that need one are refused, never skipped silently
    for kw, field in ((dict(hyde=pb.HydeOptions(enabled=True)), "hyde.enabled"),
                      (dict(query_expansion=pb.QueryExpansionOptions(enabled=True)), "query_expansion.enabled")):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _search(stub, "q", "hello", **kw)
        info = error_info(raised.value)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION and info is not None
        assert (info.reason, info.metadata["field"]) == ("GENERATOR_UNAVAILABLE", field)
    for kw, field in ((dict(compression=pb.CompressionOptions(enabled=True, max_tokens=40000)), "compression.max_tokens"),
                      (dict(query_expansion=pb.QueryExpansionOptions(enabled=True, variants=9)),
                       "query_expansion.variants"),
                      (dict(rerank=pb.RerankOptions(enabled=True, candidates=5000)), "rerank.candidates")):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _search(stub, "q", "hello", **kw)
        info = error_info(raised.value)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info is not None
        assert (info.reason, info.metadata["field"]) == ("INVALID_STAGE_OPTIONS", field)
    # knowledge-graph mode needs a collection created with knowledge_graph_enabled (test_retrieval_graph.py)
    assert await _code(_search(stub, "q", "hello", mode=pb.SEARCH_MODE_KNOWLEDGE_GRAPH)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "KNOWLEDGE_GRAPH_DISABLED")
    assert await _code(_search(stub, "q", "   ")) == (grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_QUERY")
    assert await _code(_search(stub, "q", "x" * 5000)) == (grpc.StatusCode.INVALID_ARGUMENT, "QUERY_TOO_LONG")
    assert await _code(_search(stub, "q", "x", top_k=101)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TOP_K")
    assert await _code(_search(stub, "q", "x", fusion=pb.FusionOptions(dense_weight=-1))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FUSION")
    assert await _code(stub.CreateCollection(pb.CreateCollectionRequest(
        collection_id="kg", collection=pb.Collection(knowledge_graph_enabled=True, entity_extractor="spacy")),
        metadata=A)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ENTITY_EXTRACTOR")
    # the LLM extractor asks the generator, which this service has none of (test_retrieval_graph_llm.py)
    assert await _code(stub.CreateCollection(pb.CreateCollectionRequest(
        collection_id="kg", collection=pb.Collection(knowledge_graph_enabled=True, entity_extractor="llm")),
        metadata=A)) == (grpc.StatusCode.FAILED_PRECONDITION, "GENERATOR_UNAVAILABLE")
    assert await _code(_create(stub, "bad", chunk_size_tokens=16, chunk_overlap_tokens=16)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CHUNKING")

    async def no_config() -> AsyncIterator[pb.IngestDocumentsRequest]:
        yield pb.IngestDocumentsRequest(document=_doc("d", "text"))

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        [r async for r in stub.IngestDocuments(no_config(), metadata=A)]
    assert error_info(raised.value).reason == "MISSING_INGEST_CONFIG"  # type: ignore[union-attr]
    big = _final(await _ingest(stub, "q", [_doc("big", "word " * (svc.settings.max_document_bytes // 4))]))
    assert big[0].error_reason == "DOCUMENT_TOO_LARGE"


async def test_acl_canary_denied_document_never_surfaces(svc: Harness) -> None:
    """The secret document is the best match for the query in every mode; a principal without access
    gets exactly what it would get from a collection that never held it."""
    stub = svc.stub
    secret = "Project nightingale merger: the acquisition price is ninety million for nightingale"
    public = [_doc(f"pub{i}", t) for i, t in enumerate(PLAIN)]
    for cid in ("acl", "control"):
        await _create(stub, cid)
    await _ingest(stub, "acl", [*public, _doc("secret", secret, acl=["user:ceo", "group:board"]),
                                _doc("eng", "Nightingale build pipeline notes for engineers", acl=["group:eng"])])
    await _ingest(stub, "control", [*public, _doc("eng", "Nightingale build pipeline notes for engineers",
                                                  acl=["group:eng"])])
    query = "nightingale acquisition price merger"
    alice = pb.Principal(subject="user:alice", groups=["group:eng"])
    for mode in (pb.SEARCH_MODE_SPARSE, pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_HYBRID):
        for principal in (alice, pb.Principal(), pb.Principal(subject="user:ceo-assistant", groups=["group:boards"])):
            denied = await _search(stub, "acl", query, mode=mode, top_k=100, principal=principal)
            control = await _search(stub, "control", query, mode=mode, top_k=100, principal=principal)
            assert "secret" not in _docs_of(denied)
            assert all("ninety million" not in r.chunk.text and "merger" not in r.chunk.text for r in denied.results)
            assert denied.candidates_considered == control.candidates_considered
            assert len(denied.results) == len(control.results) and _docs_of(denied) == _docs_of(control), mode
        for principal in (pb.Principal(subject="user:ceo"), pb.Principal(subject="user:bob", groups=["group:board"])):
            allowed = await _search(stub, "acl", query, mode=mode, principal=principal)
            assert _docs_of(allowed)[0] == "secret", (mode, principal)
    anonymous = await _search(stub, "acl", "nightingale", top_k=100, mode=pb.SEARCH_MODE_SPARSE)
    assert _docs_of(anonymous) == []
    engineer = await _search(stub, "acl", "nightingale", mode=pb.SEARCH_MODE_SPARSE, principal=alice)
    assert _docs_of(engineer) == ["eng"]
    # tightening the access list takes effect at the next search (the index is stale and rebuilt)
    await _ingest(stub, "acl", [_doc("eng", "Nightingale build pipeline notes for engineers", acl=["group:ops"])])
    assert _docs_of(await _search(stub, "acl", "nightingale", mode=pb.SEARCH_MODE_SPARSE, principal=alice)) == []


async def test_indexes_are_persisted_and_rebuilt_when_missing_or_stale(database_url: str, tmp_path: Path) -> None:
    settings = _settings(database_url, tmp_path)
    running = await start(settings, port=0, metrics=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            coll = await _create(stub, "persist")
            await _ingest(stub, "persist", [_doc(f"p{i}", t) for i, t in enumerate(PLAIN)])
            assert _docs_of(await _search(stub, "persist", "penguins", mode=pb.SEARCH_MODE_SPARSE)) == ["p1"]
            assert running.indexes.builds == 1
            await _search(stub, "persist", "penguins")
            assert running.indexes.builds == 1  # unchanged generation: the built index is reused
            await _ingest(stub, "persist", [_doc("p4", "Penguins huddle together in the antarctic winter")])
            assert sorted(_docs_of(await _search(stub, "persist", "penguins", mode=pb.SEARCH_MODE_SPARSE))) == [
                "p1", "p4"]
            assert running.indexes.builds == 2
    finally:
        await running.stop()
    assert coll.name == "collections/persist"
    running = await start(settings, port=0, metrics=False)  # a restart loads the persisted index
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            assert sorted(_docs_of(await _search(stub, "persist", "penguins", mode=pb.SEARCH_MODE_DENSE,
                                                 top_k=2))) == ["p1", "p4"]
            assert running.indexes.builds == 0
            shutil.rmtree(settings.resolved_index_dir())  # lost indexes come back from the database
            running.indexes._indexes.clear()
            assert sorted(_docs_of(await _search(stub, "persist", "penguins", mode=pb.SEARCH_MODE_SPARSE))) == [
                "p1", "p4"]
            assert running.indexes.builds == 1
    finally:
        await running.stop()


async def test_document_ingested_events_through_the_outbox(nats_server: NatsServer, tmp_path: Path) -> None:
    import nats

    settings = _settings(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, nats_server.url)
    running = await start(settings, port=0, metrics=False)
    nc = await nats.connect(nats_server.url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            await _create(stub, "ev")
            await _ingest(stub, "ev", [_doc("a", PLAIN[0]), _doc("b", ""), _doc("a", PLAIN[0])])
        assert running.publisher is not None and await running.publisher.flush(20)
        sub = await nc.jetstream().pull_subscribe("llmo.retrieval.v1.document_ingested", durable="test")
        messages = await sub.fetch(5, timeout=5)
        events = [events_pb2.DocumentIngested.FromString(m.data) for m in messages]
        # one event: the empty document failed and the repeat was skipped
        assert [(e.document, e.chunks, e.tenant) for e in events] == [("collections/ev/documents/a", 1, "tenantA")]
        assert messages[0].headers and messages[0].headers["Nats-Msg-Id"] == events[0].event_id
    finally:
        await nc.close()
        await running.stop()
