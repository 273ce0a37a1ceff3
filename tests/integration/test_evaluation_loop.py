"""The quality loop, end to end with real services: the router routes by bandit between a model that
answers the question and one that answers junk; its completed events carry their content; the
evaluation service scores them (answer relevancy, MiniLM, no judge) and publishes
`llmo.evaluation.v1.scored`; the router's bandit learns from those scores and sends the traffic to
the model that answers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from llmo.core.natsd import NatsServer
from llmo.protos.router.v1 import router_service_pb2 as rpb
from llmo.protos.router.v1 import router_service_pb2_grpc as rpb_grpc
from llmo.router.fake_backend import FakeBackend
from llmo.router.main import start as start_router
from llmo.router.settings import RouterSettings
from tests.integration.evaluation_harness import settings, started

ROUTER_KEYS = {"ka": "tenantA"}
QUESTIONS = ["How do I reset my password", "What is the capital of France", "How tall is Mount Everest",
             "Why is the sky blue", "How do vaccines train the immune system", "What causes ocean tides",
             "How does a bicycle stay upright", "What is photosynthesis", "When did the Roman empire fall",
             "How do I bake sourdough bread"]


def portfolio(base_url: str) -> str:
    models = "".join(f"""
  - name: {name}
    provider: local
    input_price_micros_per_mtok: 100000
    output_price_micros_per_mtok: 100000
    context_window: 4096
    quality: 0.7
""" for name in ("good", "junk"))
    return f"""
providers:
  local:
    kind: openai
    base_url: {base_url}
    max_retries: 0
models:{models}
routing:
  default_model: good
"""


async def _routed(stub: rpb_grpc.RouterServiceStub, question: str) -> str:
    request = rpb.CompleteRequest(messages=[rpb.ChatMessage(role="user", content=f"{question}?")], skip_cache=True,
                                  routing=rpb.RoutingOptions(policy=rpb.ROUTING_POLICY_BANDIT))
    out = [r async for r in stub.Complete(request, metadata=[("authorization", "Bearer ka")])]
    return out[-1].model


async def test_scores_from_the_evaluation_service_move_the_routers_traffic_to_the_better_model(
        tmp_path: Path, nats_server: NatsServer) -> None:
    backend = await FakeBackend(behaviours={"good": "echo"}, tokens=8).start()
    (tmp_path / "portfolio.yaml").write_text(portfolio(backend.base_url))
    router = await start_router(RouterSettings(
        database_url=f"sqlite:///{tmp_path / 'router.db'}", metrics_port=-1,
        portfolio_path=str(tmp_path / "portfolio.yaml"), event_content_sample=1.0, reward_metrics="answer_relevancy",
        platform={"nats_url": nats_server.url, "data_dir": tmp_path / "router", "drain_seconds": 0.2,
                  "api_keys": ROUTER_KEYS}), port=0, http_port=0, metrics=False)
    evaluation, eval_channel, _ = await started(settings(
        f"sqlite:///{tmp_path / 'evaluation.db'}", tmp_path / "evaluation", nats_server.url,
        online_sources="router", online_metrics="answer_relevancy"))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}")
    stub = rpb_grpc.RouterServiceStub(channel)
    bandit = router.gateway.bandit
    try:
        first = [await _routed(stub, QUESTIONS[i % len(QUESTIONS)]) for i in range(30)]
        assert {"good", "junk"} <= set(first)  # before any score the bandit explores both
        # every routed request gets scored by the evaluation service and credited to its arm
        async with asyncio.timeout(120):
            while sum(s.pulls for s in bandit.states("tenantA", "models", ["good", "junk"]).values()) < 30:
                await asyncio.sleep(0.2)
        states = bandit.states("tenantA", "models", ["good", "junk"])
        assert states["good"].mean > 0.6 > 0.3 > states["junk"].mean
        later = [await _routed(stub, QUESTIONS[i % len(QUESTIONS)]) for i in range(30)]
        assert later.count("good") >= 24 and later.count("good") > first.count("good")
    finally:
        await channel.close()
        await eval_channel.close()
        await evaluation.stop()
        await router.stop()
        await backend.stop()
