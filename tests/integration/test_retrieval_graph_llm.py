"""Knowledge-graph collections with `entity_extractor: "llm"` over real gRPC, SQLite and PostgreSQL:
each chunk's entities and relations come from an OpenAI-compatible server on a socket (it stands in
for the router / a paid LLM API) answering good JSON, garbage, errors and never; the chunks it
fails on get the local extractor's graph, the fallbacks are counted in the progress, and the ingest
never fails. Search, evidence and access control then work as with the local extractor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from llmo.core.settings import PlatformSettings
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.protos.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc
from llmo.retrieval.main import start
from llmo.retrieval.settings import RetrievalSettings
from tests.integration.test_retrieval_service import _code, _doc, _docs_of, _final, _ingest
from tests.unit.retrieval.test_graph_llm import TEXT, GraphUpstream, reply

A = [("authorization", "Bearer ka")]
KG = pb.SEARCH_MODE_KNOWLEDGE_GRAPH


@dataclass
class Harness:
    upstream: GraphUpstream
    stub: pb_grpc.RetrievalServiceStub


@pytest.fixture
async def svc(database_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    upstream = await GraphUpstream(hang_s=60, reply=reply).start()
    settings = RetrievalSettings(
        database_url=database_url, metrics_port=-1, generator_url=upstream.base_url, generator_api_key="svc-key",
        graph_extractor_model="extractor", graph_extractor_timeout_s=0.5, publish_events=False,
        platform=PlatformSettings(nats_url="nats://127.0.0.1:1", data_dir=tmp_path, drain_seconds=0.5,
                                  api_keys={"ka": "tenantA"}))
    running = await start(settings, port=0, metrics=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield Harness(upstream, pb_grpc.RetrievalServiceStub(channel))
    finally:
        await running.stop()
        await upstream.stop()


async def _kg(stub: pb_grpc.RetrievalServiceStub, query: str, **kw: Any) -> pb.SearchResponse:
    return await stub.Search(pb.SearchRequest(collection="collections/kg", query=query, mode=KG, **kw), metadata=A)


async def test_llm_graphs_with_fallbacks_counted_and_searched(svc: Harness) -> None:
    stub = svc.stub
    created = (await stub.CreateCollection(pb.CreateCollectionRequest(collection_id="kg", collection=pb.Collection(
        knowledge_graph_enabled=True, entity_extractor="llm", chunking=pb.ChunkingConfig(
            chunk_size_tokens=12, chunk_overlap_tokens=0, strategy=pb.CHUNKING_STRATEGY_SENTENCE))),
        metadata=A)).collection
    assert (created.knowledge_graph_enabled, created.entity_extractor) == (True, "llm")
    secret = "Marie Curie secretly measured radium."
    replies = await _ingest(stub, "kg", [_doc("curie", TEXT), _doc("secret", secret, acl=["user:ceo"])])
    final = _final(replies)
    # four sentence chunks: good JSON, garbage, no answer before the deadline, HTTP 500
    assert [(p.stage, p.chunks, p.graph_fallback_chunks) for p in final.values()] == [
        (pb.INGEST_STAGE_INDEXED, 4, 3), (pb.INGEST_STAGE_INDEXED, 1, 0)]
    assert replies[-1].summary.graph_fallback_chunks == 3 and replies[-1].summary.documents_failed == 0
    ids = sorted(h["x-request-id"].split(":", 1)[1] for h in svc.upstream.seen)
    assert ids == ["graph_extract:0:0", "graph_extract:0:1", "graph_extract:0:2", "graph_extract:0:3",
                   "graph_extract:1:0"]
    assert {(h["x-llmo-tenant"], h["authorization"], h["model"]) for h in svc.upstream.seen} == {
        ("tenantA", "Bearer svc-key", "extractor")}

    # polonium, a lower-case word written once, is an entity only because the generator named it
    found = await _kg(stub, "polonium")
    assert _docs_of(found) == ["curie"] and found.results[0].chunk.index == 0
    assert list(found.results[0].matched_entities) == ["polonium", "Marie Curie"]
    assert [(r.subject, r.predicate, r.object) for r in found.results[0].relations] == [
        ("Marie Curie", "discovered", "polonium")]
    # the chunks the generator failed on got the local extractor's graph
    for name, index in (("Lise Meitner", 1), ("Otto Hahn", 2), ("Niels Bohr", 3)):
        hit = await _kg(stub, name)
        assert [(d, r.chunk.index) for d, r in zip(_docs_of(hit), hit.results, strict=True)] == [("curie", index)]
    # what the generator made up about other chunks never entered the graph
    assert _docs_of(await _kg(stub, "Albert Einstein")) == []
    # access control is applied at search time, as for the local extractor
    assert _docs_of(await _kg(stub, "radium")) == ["curie"]
    assert "Marie Curie secretly" not in str(await _kg(stub, "Marie Curie", top_k=100))
    assert sorted(_docs_of(await _kg(stub, "radium", principal=pb.Principal(subject="user:ceo")))) == [
        "curie", "secret"]


async def test_llm_extractor_can_be_chosen_while_empty(svc: Harness) -> None:
    stub = svc.stub
    await stub.CreateCollection(pb.CreateCollectionRequest(collection_id="kg", collection=pb.Collection(
        knowledge_graph_enabled=True)), metadata=A)
    mask = field_mask_pb2.FieldMask(paths=["entity_extractor"])
    updated = (await stub.UpdateCollection(pb.UpdateCollectionRequest(collection=pb.Collection(
        name="collections/kg", knowledge_graph_enabled=True, entity_extractor="llm"), update_mask=mask),
        metadata=A)).collection
    assert updated.entity_extractor == "llm"
    await _ingest(stub, "kg", [_doc("d", "Marie Curie discovered polonium.")])
    assert _docs_of(await _kg(stub, "polonium")) == ["d"]
    assert await _code(stub.UpdateCollection(pb.UpdateCollectionRequest(collection=pb.Collection(
        name="collections/kg", knowledge_graph_enabled=True, entity_extractor="local"), update_mask=mask),
        metadata=A)) == (grpc.StatusCode.FAILED_PRECONDITION, "COLLECTION_NOT_EMPTY")
