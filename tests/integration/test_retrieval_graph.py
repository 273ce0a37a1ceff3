"""Knowledge-graph mode over real gRPC, SQLite and PostgreSQL: collections with
`knowledge_graph_enabled`, extraction at ingest, SEARCH_MODE_KNOWLEDGE_GRAPH with its evidence,
hop expansion and filters, the access-control canary, and graph rows replaced and deleted with
their documents."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2

from llmo.core.settings import PlatformSettings
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.protos.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc
from llmo.retrieval.main import RunningRetrieval, start
from llmo.retrieval.settings import RetrievalSettings
from tests.integration.test_retrieval_service import _code

A = [("authorization", "Bearer ka")]
KG = pb.SEARCH_MODE_KNOWLEDGE_GRAPH

ADA = "We know Ada Lovelace worked with Charles Babbage on the Analytical Engine. Ada Lovelace wrote the first program."
BABBAGE = "In London, Charles Babbage designed the Difference Engine."
MUSEUM = "Much later the Science Museum built the Difference Engine from his plans."
SOMERVILLE = "We know Ada Lovelace studied mathematics with Mary Somerville."
HOPPER = "We know Grace Hopper invented the first compiler at Remington Rand."
SECRET = "We know Ada Lovelace secretly advised Project Nightingale with Lord Byron."
PUBLIC = {"ada": ADA, "babbage": BABBAGE, "museum": MUSEUM, "somerville": SOMERVILLE, "hopper": HOPPER}


@pytest.fixture
async def svc(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[RunningRetrieval, pb_grpc.RetrievalServiceStub]]:
    settings = RetrievalSettings(database_url=database_url, metrics_port=-1, platform=PlatformSettings(
        nats_url="nats://127.0.0.1:1", data_dir=tmp_path, drain_seconds=0.5, api_keys={"ka": "tenantA"}))
    running = await start(settings, port=0, metrics=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield running, pb_grpc.RetrievalServiceStub(channel)
    finally:
        await channel.close()
        await running.stop()


async def _create(stub: pb_grpc.RetrievalServiceStub, cid: str, *, graph: bool = True, extractor: str = ""
                  ) -> pb.Collection:
    return (await stub.CreateCollection(pb.CreateCollectionRequest(collection_id=cid, collection=pb.Collection(
        knowledge_graph_enabled=graph, entity_extractor=extractor)), metadata=A)).collection


def _doc(did: str, text: str, acl: Iterable[str] = (), **metadata: Any) -> pb.DocumentInput:
    doc = pb.DocumentInput(document_id=did, text=text, access_control=pb.AccessControl(allowed_principals=acl))
    doc.metadata.update(metadata)
    return doc


async def _ingest(stub: pb_grpc.RetrievalServiceStub, cid: str, docs: list[pb.DocumentInput]) -> pb.IngestSummary:
    async def requests() -> AsyncIterator[pb.IngestDocumentsRequest]:
        yield pb.IngestDocumentsRequest(config=pb.IngestConfig(collection=f"collections/{cid}"))
        for doc in docs:
            yield pb.IngestDocumentsRequest(document=doc)

    replies = [r async for r in stub.IngestDocuments(requests(), metadata=A)]
    return replies[-1].summary


async def _kg(stub: pb_grpc.RetrievalServiceStub, cid: str, query: str, **kw: Any) -> pb.SearchResponse:
    return await stub.Search(pb.SearchRequest(collection=f"collections/{cid}", query=query, mode=KG, **kw),
                             metadata=A)


def _docs(reply: pb.SearchResponse) -> list[str]:
    return [r.chunk.document.rsplit("/", 1)[1] for r in reply.results]


def _relations(result: pb.SearchResult) -> list[tuple[str, str, str]]:
    return [(r.subject, r.predicate, r.object) for r in result.relations]


def _evidence(reply: pb.SearchResponse) -> list[tuple[str, float, list[str], list[tuple[str, str, str]]]]:
    return [(d, r.score, list(r.matched_entities), _relations(r)) for d, r in zip(_docs(reply), reply.results,
                                                                                   strict=True)]


async def test_graph_search_returns_chunks_with_their_evidence(svc: tuple[RunningRetrieval, Any]) -> None:
    _, stub = svc
    created = await _create(stub, "kg")
    assert (created.knowledge_graph_enabled, created.entity_extractor) == (True, "local")
    got = (await stub.GetCollection(pb.GetCollectionRequest(name="collections/kg"), metadata=A)).collection
    assert (got.knowledge_graph_enabled, got.entity_extractor) == (True, "local")
    summary = await _ingest(stub, "kg", [_doc(d, t, era="victorian" if d != "hopper" else "modern")
                                         for d, t in PUBLIC.items()])
    assert summary.documents_indexed == 5

    one = await _kg(stub, "kg", "who worked with Ada Lovelace?")
    assert _docs(one) == ["ada", "somerville", "babbage"]
    assert list(one.results[0].matched_entities) == ["Ada Lovelace", "Analytical Engine", "Charles Babbage"]
    assert _relations(one.results[0]) == [("Ada Lovelace", "worked with", "Charles Babbage"),
                                          ("Ada Lovelace", "related_to", "Analytical Engine")]
    assert _relations(one.results[1]) == [("Ada Lovelace", "studied mathematics with", "Mary Somerville")]
    assert list(one.results[2].matched_entities) == ["Charles Babbage"] and not one.results[2].relations
    assert one.mode == KG and one.candidates_considered == 3
    assert [r.rank for r in one.results] == [1, 2, 3] and one.results[0].score > one.results[1].score
    assert [s.stage for s in one.stages] == ["knowledge_graph", "fetch"]
    assert one.stages[0].items == 3

    # two hops reach the Difference Engine through Babbage, and the museum chunk with it
    two = await _kg(stub, "kg", "who worked with Ada Lovelace?", knowledge_graph=pb.KnowledgeGraphOptions(max_hops=2))
    assert _docs(two) == ["ada", "somerville", "babbage", "museum"]
    assert ("Charles Babbage", "designed", "Difference Engine") in _relations(two.results[2])
    assert list(two.results[3].matched_entities) == ["Difference Engine"]
    assert _docs(await _kg(stub, "kg", "Ada Lovelace", top_k=1, knowledge_graph=pb.KnowledgeGraphOptions(
        max_hops=3))) == ["ada"]
    # lower-case query terms link to known entity names; filters apply before top_k
    assert _docs(await _kg(stub, "kg", "grace hopper")) == ["hopper"]
    modern = pb.MetadataFilter(key="era", operator=pb.FILTER_OPERATOR_EQUAL,
                               values=[struct_pb2.Value(string_value="modern")])
    assert _docs(await _kg(stub, "kg", "ada lovelace and grace hopper", top_k=1, filters=[modern])) == ["hopper"]
    empty = await _kg(stub, "kg", "nothing anybody knows")
    assert not empty.results and empty.candidates_considered == 0


async def test_knowledge_graph_bad_input_and_disabled_collections(svc: tuple[RunningRetrieval, Any]) -> None:
    _, stub = svc
    for extractor in ("spacy", "LOCAL"):
        assert await _code(_create(stub, f"x-{extractor.lower()}", extractor=extractor)) == (
            grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ENTITY_EXTRACTOR")
    # "llm" needs a generator, which this service has none of (test_retrieval_graph_llm.py)
    assert await _code(_create(stub, "x-llm", extractor="llm")) == (
        grpc.StatusCode.FAILED_PRECONDITION, "GENERATOR_UNAVAILABLE")
    await _create(stub, "plain", graph=False)
    assert await _code(_kg(stub, "plain", "Ada Lovelace")) == (
        grpc.StatusCode.FAILED_PRECONDITION, "KNOWLEDGE_GRAPH_DISABLED")
    assert await _code(_kg(stub, "plain", "Ada", knowledge_graph=pb.KnowledgeGraphOptions(max_hops=4))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_STAGE_OPTIONS")
    # enabling the graph is allowed while the collection is empty, not once it holds documents
    enabled = (await stub.UpdateCollection(pb.UpdateCollectionRequest(
        collection=pb.Collection(name="collections/plain", knowledge_graph_enabled=True),
        update_mask=field_mask_pb2.FieldMask(paths=["knowledge_graph_enabled"])), metadata=A)).collection
    assert (enabled.knowledge_graph_enabled, enabled.entity_extractor) == (True, "local")
    await _ingest(stub, "plain", [_doc("ada", ADA)])
    assert _docs(await _kg(stub, "plain", "Ada Lovelace")) == ["ada"]
    assert await _code(stub.UpdateCollection(pb.UpdateCollectionRequest(
        collection=pb.Collection(name="collections/plain", knowledge_graph_enabled=False),
        update_mask=field_mask_pb2.FieldMask(paths=["knowledge_graph_enabled"])), metadata=A)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "COLLECTION_NOT_EMPTY")


async def test_acl_canary_denied_graph_never_surfaces(svc: tuple[RunningRetrieval, Any]) -> None:
    """The secret document links Ada Lovelace to Project Nightingale and Lord Byron; a principal
    without access gets exactly what a collection that never held it returns: the same chunks,
    scores, matched entities, relations and counts."""
    _, stub = svc
    for cid in ("acl", "control"):
        await _create(stub, cid)
    public = [_doc(d, t) for d, t in PUBLIC.items()]
    await _ingest(stub, "acl", [*public[:2], _doc("secret", SECRET, acl=["user:ceo", "group:board"]), *public[2:]])
    await _ingest(stub, "control", public)
    denied = (pb.Principal(), pb.Principal(subject="user:alice", groups=["group:eng"]),
              pb.Principal(subject="user:ceo-assistant", groups=["group:boards"]))
    queries = ("who worked with Ada Lovelace", "Project Nightingale", "lord byron", "Ada Lovelace and Lord Byron")
    for principal in denied:
        for query in queries:
            for hops in (1, 2, 3):
                options = pb.KnowledgeGraphOptions(max_hops=hops)
                got = await _kg(stub, "acl", query, top_k=100, principal=principal, knowledge_graph=options)
                want = await _kg(stub, "control", query, top_k=100, principal=principal, knowledge_graph=options)
                assert _evidence(got) == _evidence(want), (query, hops)
                assert got.candidates_considered == want.candidates_considered
                assert [s.items for s in got.stages] == [s.items for s in want.stages]
                text = str(got)
                assert "Nightingale" not in text and "Byron" not in text and "advised" not in text
    for principal in (pb.Principal(subject="user:ceo"), pb.Principal(subject="user:bob", groups=["group:board"])):
        allowed = await _kg(stub, "acl", "who worked with Ada Lovelace", principal=principal)
        assert "secret" in _docs(allowed)
        secret = allowed.results[_docs(allowed).index("secret")]
        assert ("Ada Lovelace", "advised", "Project Nightingale") in _relations(secret)
        # from Lord Byron, one hop reaches Ada Lovelace through the secret relation, and her public chunks
        assert _docs(await _kg(stub, "acl", "lord byron", principal=principal)) == ["secret", "ada", "somerville"]


async def test_graph_rows_follow_reingest_and_deletes(svc: tuple[RunningRetrieval, Any]) -> None:
    running, stub = svc
    await _create(stub, "life")
    await _ingest(stub, "life", [_doc("ada", ADA), _doc("babbage", BABBAGE)])
    coll = running.store.get_collection("tenantA", "life")
    assert running.store.graph_counts(coll.pk) == (5, 6, 6)
    assert _docs(await _kg(stub, "life", "Analytical Engine")) == ["ada", "babbage"]  # via Charles Babbage

    # new content replaces the document's graph rows: its old entities and relations are gone
    await _ingest(stub, "life", [_doc("ada", "We know Ada Lovelace befriended Michael Faraday.")])
    assert running.store.graph_counts(coll.pk) == (5, 5, 4)
    assert _docs(await _kg(stub, "life", "Analytical Engine")) == []
    reply = await _kg(stub, "life", "Ada Lovelace")
    assert _docs(reply) == ["ada"]
    assert _relations(reply.results[0]) == [("Ada Lovelace", "befriended", "Michael Faraday")]
    # new metadata only: the graph is kept, the access list is read at search time
    await _ingest(stub, "life", [_doc("ada", "We know Ada Lovelace befriended Michael Faraday.", acl=["user:ceo"])])
    assert running.store.graph_counts(coll.pk) == (5, 5, 4)
    assert _docs(await _kg(stub, "life", "Michael Faraday")) == []
    assert _docs(await _kg(stub, "life", "Michael Faraday", principal=pb.Principal(subject="user:ceo"))) == ["ada"]

    await stub.DeleteDocument(pb.DeleteDocumentRequest(name="collections/life/documents/ada"), metadata=A)
    assert running.store.graph_counts(coll.pk) == (3, 3, 3)
    assert _docs(await _kg(stub, "life", "Michael Faraday", principal=pb.Principal(subject="user:ceo"))) == []
    assert _docs(await _kg(stub, "life", "Charles Babbage")) == ["babbage"]
    await stub.DeleteCollection(pb.DeleteCollectionRequest(name="collections/life", force=True), metadata=A)
    assert running.store.graph_counts(coll.pk) == (0, 0, 0)
