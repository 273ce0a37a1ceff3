"""Query expansion with chat history, HyDE and compression through the real router: retrieval
calls the router's OpenAI-compatible HTTP API as its generator (its own service key, the
searching tenant in `x-llmo-tenant`); the router calls a scripted upstream on a socket (it stands
in for a paid LLM provider) and meters every generation to the searching tenant once. A failing
or hanging generator leaves the plain query; a denied document never reaches a prompt or the
compressed context."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import nats.errors
import pytest

from llmo.core.events import EventBus
from llmo.core.natsd import NatsServer
from llmo.core.settings import PlatformSettings
from llmo.protos.events.v1 import events_pb2
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.protos.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc
from llmo.retrieval import chunking
from llmo.retrieval.main import RunningRetrieval
from llmo.retrieval.main import start as start_retrieval
from llmo.retrieval.settings import RetrievalSettings
from llmo.router.fake_backend import FakeBackend
from llmo.router.main import RunningRouter
from llmo.router.main import start as start_router
from llmo.router.settings import RouterSettings
from tests.integration.test_retrieval_service import _create, _doc, _docs_of, _ingest
from tests.unit.retrieval.corpus import PLAIN

SECRET = "Project nightingale merger: the acquisition price is ninety million"
REPLIES = {
    "expand": "Can penguins fly\nflightless birds of the southern hemisphere\n2. do penguins have wings for flying",
    "hyde": "Penguins cannot fly. They are flightless birds that use their wings as flippers to swim.",
}
PORTFOLIO = """
providers:
  upstream: {kind: openai, base_url: BASE, max_retries: 0, first_token_timeout_s: 3, idle_timeout_s: 3}
models:
  - {name: expand, provider: upstream, input_price_micros_per_mtok: 100000, output_price_micros_per_mtok: 200000, context_window: 8192}
  - {name: hyde, provider: upstream, input_price_micros_per_mtok: 100000, output_price_micros_per_mtok: 200000, context_window: 8192}
  - {name: broken, provider: upstream, input_price_micros_per_mtok: 100000, output_price_micros_per_mtok: 200000, context_window: 8192}
  - {name: slow, provider: upstream, input_price_micros_per_mtok: 100000, output_price_micros_per_mtok: 200000, context_window: 8192}
routing:
  default_model: expand
"""
ROUTER_KEYS = {"key-retrieval": "retrieval", "key-other": "tenantX"}
RETRIEVAL_KEYS = {"kb": "tenantB"}
B = [("authorization", "Bearer kb")]
HISTORY = [pb.ConversationTurn(role="user", content="Tell me about penguins"),
           pb.ConversationTurn(role="assistant", content="They are birds of the south.")]


class ScriptedUpstream(FakeBackend):
    """The fake provider answering each model with its scripted reply."""

    def _words(self, model: str, body: dict[str, Any]) -> list[str]:
        reply = REPLIES.get(model, f"{model} reply")
        words = reply.split(" ")
        return [w + " " for w in words[:-1]] + [words[-1]]


@dataclass
class Stack:
    upstream: ScriptedUpstream
    router: RunningRouter
    retrieval: RunningRetrieval
    stub: pb_grpc.RetrievalServiceStub


@pytest.fixture
async def stack(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[Stack]:
    upstream = await ScriptedUpstream(hang_s=30).start()
    upstream.behaviours.update(broken="error", slow="hang")
    portfolio = tmp_path / "portfolio.yaml"
    portfolio.write_text(PORTFOLIO.replace("BASE", upstream.base_url))
    router = await start_router(RouterSettings(
        database_url=f"sqlite:///{tmp_path / 'router.db'}", metrics_port=-1, portfolio_path=str(portfolio),
        platform={"nats_url": nats_server.url, "data_dir": tmp_path / "router", "drain_seconds": 0.2,
                  "api_keys": ROUTER_KEYS, "admin_tenants": ["retrieval"]}), port=0, http_port=0, metrics=False)
    retrieval = await start_retrieval(RetrievalSettings(
        database_url=f"sqlite:///{tmp_path / 'r.db'}", metrics_port=-1, min_candidates=10, publish_events=False,
        generator_url=f"http://127.0.0.1:{router.http_port}", generator_api_key="key-retrieval",
        generator_timeout_s=1.5,
        platform=PlatformSettings(nats_url=nats_server.url, data_dir=tmp_path / "retrieval", drain_seconds=0.5,
                                  api_keys=RETRIEVAL_KEYS)), port=0, metrics=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{retrieval.port}")
    stub = pb_grpc.RetrievalServiceStub(channel)
    await _create(stub, "kb", B)
    await _ingest(stub, "kb", [*[_doc(f"p{i}", t) for i, t in enumerate(PLAIN)],
                               _doc("secret", SECRET, acl=["user:ceo"])], B)
    try:
        yield Stack(upstream, router, retrieval, stub)
    finally:
        await channel.close()
        await retrieval.stop()
        await upstream.stop()  # releases the hanging calls first
        await router.stop()


async def _completed_events(nats_url: str, want: int) -> list[events_pb2.RouterCompleted]:
    bus = await EventBus(nats_url).connect()
    await bus.ensure_stream("router")
    sub = await bus.js.pull_subscribe("llmo.router.v1.completed", durable="retrieval-test", stream="LLMO_ROUTER")
    got: list[events_pb2.RouterCompleted] = []
    try:
        async with asyncio.timeout(30):
            while len(got) < want:
                try:
                    for message in await sub.fetch(want - len(got), timeout=2):
                        got.append(events_pb2.RouterCompleted.FromString(message.data))
                        await message.ack()
                except nats.errors.TimeoutError:
                    continue
    finally:
        await bus.close()
    return got


async def test_history_expansion_and_hyde_go_through_the_router_billed_to_the_searcher(
        stack: Stack, nats_server: NatsServer) -> None:
    reply = await stack.stub.Search(pb.SearchRequest(
        collection="collections/kb", query="Can they fly?", top_k=3, history=HISTORY,
        query_expansion=pb.QueryExpansionOptions(enabled=True, variants=2, model="expand"),
        hyde=pb.HydeOptions(enabled=True, model="hyde")), metadata=B)
    # the standalone rewrite (first line) and the paraphrases were searched; HyDE joined the dense query
    assert list(reply.expanded_queries) == ["Can penguins fly", "flightless birds of the southern hemisphere",
                                            "do penguins have wings for flying"]
    assert reply.hypothetical_document == REPLIES["hyde"]
    assert _docs_of(reply)[0] == "p1"
    stages = {s.stage: s for s in reply.stages}
    assert not stages["query_expansion"].fell_back and stages["query_expansion"].items == 2
    assert not stages["hyde"].fell_back and stages["hyde"].latency_ms > 0
    assert reply.usage.output_tokens == sum(len(r.split(" ")) for r in REPLIES.values())
    # what the upstream saw: the history and the query, never a document (the canary's text least of all)
    prompts = [m["content"] for body in stack.upstream.requests for m in body["messages"]]
    assert any("Tell me about penguins" in p and "Can they fly?" in p for p in prompts)
    assert all("nightingale" not in p.lower() and "Penguins are flightless" not in p for p in prompts)
    # the router metered both generations once each, to the tenant that searched
    events = await _completed_events(nats_server.url, 2)
    assert sorted(e.model for e in events) == ["expand", "hyde"]
    assert {e.attribution.tenant for e in events} == {"tenantB"} and {e.status for e in events} == {"ok"}
    assert len({e.request_id for e in events}) == 2
    assert {e.request_id.rsplit(":", 1)[1] for e in events} == {"query_expansion", "hyde"}
    assert {h["x-llmo-tenant"] for h in stack.upstream.headers} == {"tenantB"}


async def test_a_failing_or_hanging_generator_leaves_the_plain_query(stack: Stack) -> None:
    plain = await stack.stub.Search(pb.SearchRequest(collection="collections/kb", query="flightless birds", top_k=3),
                                    metadata=B)
    for model, reason in (("broken", "GENERATOR_FAILED"), ("slow", "GENERATOR_TIMEOUT")):
        reply = await stack.stub.Search(pb.SearchRequest(
            collection="collections/kb", query="flightless birds", top_k=3,
            query_expansion=pb.QueryExpansionOptions(enabled=True, model=model),
            hyde=pb.HydeOptions(enabled=True, model=model)), metadata=B)
        fell = {s.stage: s.fallback_reason for s in reply.stages if s.fell_back}
        assert fell == {"query_expansion": reason, "hyde": reason}, (model, reply.stages)
        assert _docs_of(reply) == _docs_of(plain) and list(reply.expanded_queries) == []
        assert reply.hypothetical_document == "" and reply.usage.output_tokens == 0
        assert reply.latency_ms < 1000 * 10  # both calls ran at once, each cut at its own deadline


async def test_compression_keeps_query_sentences_within_budget_and_never_a_denied_one(stack: Stack) -> None:
    for principal in (pb.Principal(subject="user:alice"), pb.Principal()):
        reply = await stack.stub.Search(pb.SearchRequest(
            collection="collections/kb", query="nightingale acquisition price for penguins", top_k=5,
            principal=principal, compression=pb.CompressionOptions(enabled=True, max_tokens=30)), metadata=B)
        assert "secret" not in _docs_of(reply) and "nightingale" not in reply.compressed_context.lower()
        assert reply.compressed_context and chunking.token_count(reply.compressed_context) <= 30
        kept = [r.compressed_text for r in reply.results if r.compressed_text]
        assert reply.compressed_context == "\n\n".join(kept)
        assert all(s in r.chunk.text for r in reply.results for s in chunking.sentences(r.compressed_text))
        assert next(s for s in reply.stages if s.stage == "compression").items >= 1
    ceo = await stack.stub.Search(pb.SearchRequest(
        collection="collections/kb", query="nightingale acquisition price", top_k=5, principal=pb.Principal(
            subject="user:ceo"), compression=pb.CompressionOptions(enabled=True)), metadata=B)
    assert "ninety million" in ceo.compressed_context
