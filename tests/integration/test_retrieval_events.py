"""`llmo.retrieval.v1.searched`: one event per search through the outbox and a real nats-server,
carrying the stages the search ran with their latency, the tenant from the API key and the
caller's attribution."""

from __future__ import annotations

from pathlib import Path

import grpc

from llmo.core.natsd import NatsServer
from llmo.protos.common.v1 import common_pb2
from llmo.protos.events.v1 import events_pb2
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.protos.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc
from llmo.retrieval.main import start
from tests.integration.test_retrieval_service import B, _create, _doc, _ingest, _settings
from tests.unit.retrieval.corpus import PLAIN


async def test_every_search_publishes_its_stages_once(nats_server: NatsServer, tmp_path: Path) -> None:
    import nats

    settings = _settings(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, nats_server.url)
    running = await start(settings, port=0, metrics=False)
    nc = await nats.connect(nats_server.url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            await _create(stub, "ev", B)
            await _ingest(stub, "ev", [_doc(f"d{i}", t) for i, t in enumerate(PLAIN)], B)
            hybrid = await stub.Search(pb.SearchRequest(
                collection="collections/ev", query=PLAIN[0].split(".")[0], top_k=3, reorder=pb.ReorderOptions(enabled=True),
                attribution=common_pb2.Attribution(application="kb-bot", user="u1", tenant="spoofed")), metadata=B)
            sparse = await stub.Search(pb.SearchRequest(collection="collections/ev", query="nothing matches zzzq",
                                                        mode=pb.SEARCH_MODE_SPARSE), metadata=B)
        assert [s.stage for s in hybrid.stages] == ["index", "embed", "dense", "sparse", "fusion", "fetch", "reorder"]
        assert all(s.latency_ms >= 0 for s in hybrid.stages) and hybrid.latency_ms >= max(s.latency_ms for s in hybrid.stages)
        assert sorted(r.rank for r in hybrid.results) == [1, 2, 3]
        assert len(sparse.results) == 0 and [s.stage for s in sparse.stages][:2] == ["index", "sparse"]
        assert running.publisher is not None and await running.publisher.flush(20)
        sub = await nc.jetstream().pull_subscribe("llmo.retrieval.v1.searched", durable="test")
        messages = await sub.fetch(5, timeout=5)
        events = [events_pb2.RetrievalSearched.FromString(m.data) for m in messages]
        assert len(events) == 2 and len({e.event_id for e in events}) == 2
        first, second = events
        assert (first.collection, first.tenant, first.mode, first.top_k, first.results) == (
            "collections/ev", "tenantB", pb.SEARCH_MODE_HYBRID, 3, 3)
        # the tenant is the API key's, whatever the caller wrote in its attribution
        assert (first.attribution.tenant, first.attribution.application, first.attribution.user) == (
            "tenantB", "kb-bot", "u1")
        assert [(s.stage, round(s.latency_ms, 6)) for s in first.stages] == [
            (s.stage, round(s.latency_ms, 6)) for s in hybrid.stages]
        assert first.request_id and first.request_id != second.request_id
        assert (second.mode, second.results, second.candidates_considered) == (pb.SEARCH_MODE_SPARSE, 0, len(PLAIN))
    finally:
        await nc.close()
        await running.stop()
