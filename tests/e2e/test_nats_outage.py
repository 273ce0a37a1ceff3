"""A NATS outage as a user lives it: real nats-server, cost, inference (demo model) and the
router, two tenants calling the router's OpenAI-compatible HTTP API. nats-server is stopped,
200 completions go through router -> inference, nats-server comes back, and every one of
them reaches the cost ledger exactly once, charged to the tenant that sent it.

Per-request latency with NATS down and up is printed (p50/p99), not asserted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
import pytest_asyncio

from llmo.core.natsd import NatsServer
from llmo.core.settings import PlatformSettings
from llmo.cost.main import RunningCost
from llmo.cost.main import start as start_cost
from llmo.cost.settings import CostSettings
from llmo.inference.backends.native import NativeBackend
from llmo.inference.engine.engine import EngineConfig, LLMEngine
from llmo.inference.main import RunningInference
from llmo.inference.main import start as start_inference
from llmo.inference.models.loader import load_model
from llmo.inference.settings import InferenceSettings
from llmo.protos.cost.v1 import cost_service_pb2 as cost_pb
from llmo.protos.cost.v1 import cost_service_pb2_grpc as cost_grpc
from llmo.router.main import RunningRouter
from llmo.router.main import start as start_router
from llmo.router.settings import RouterSettings

pytestmark = pytest.mark.slow

DEMO = "llmo-demo"
KEYS = {"key-a": "tenant-a", "key-b": "tenant-b", "key-router": "router", "key-finops": "finops"}
TENANT_KEYS = {"tenant-a": "key-a", "tenant-b": "key-b"}
ROUTER_KEY_ENV = "LLMO_E2E_ROUTER_INFERENCE_KEY"
DURING_OUTAGE = 200
WITH_NATS_UP = 40


@dataclass
class Stack:
    nats: NatsServer
    cost: RunningCost
    inference: RunningInference
    router: RunningRouter

    def client(self, tenant: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{self.router.http_port}/v1", api_key=TENANT_KEYS[tenant], max_retries=0, timeout=60
        )


def portfolio(inference_http_port: int) -> str:
    return f"""
providers:
  inference:
    kind: openai
    base_url: http://127.0.0.1:{inference_http_port}/v1
    api_key_env: {ROUTER_KEY_ENV}
    max_retries: 0
models:
  - name: {DEMO}
    provider: inference
    input_price_micros_per_mtok: 50000
    output_price_micros_per_mtok: 100000
    context_window: 2048
    max_output_tokens: 16
    quality: 0.3
    latency: {{ttft_ms: 100, tokens_per_s: 50}}
routing:
  default_model: {DEMO}
"""


@pytest_asyncio.fixture
async def stack(nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    monkeypatch.setenv(ROUTER_KEY_ENV, "key-router")
    platform = PlatformSettings(
        nats_url=nats_server.url, data_dir=tmp_path, api_keys=KEYS, admin_tenants=frozenset({"router", "finops"}),
        drain_seconds=0.5,
    )
    cost = await start_cost(CostSettings(metrics_port=-1, platform=platform), port=0, metrics=False)
    loaded = await asyncio.to_thread(load_model, name=DEMO)
    backend = NativeBackend(loaded, LLMEngine(loaded, EngineConfig(num_blocks=128)), DEMO)
    inference = await start_inference(
        InferenceSettings(publish_events=True, metrics_port=-1, platform=platform),
        port=0, http_port=0, metrics=False, backends=[backend],
    )
    portfolio_file = tmp_path / "portfolio.yaml"
    portfolio_file.write_text(portfolio(inference.http_port or 0))
    router = await start_router(
        RouterSettings(
            metrics_port=-1, portfolio_path=str(portfolio_file), cost_target=f"127.0.0.1:{cost.port}",
            cost_api_key="key-router", cache_enabled=False, compression_model_dir="none", platform=platform,
        ),
        port=0, http_port=0, metrics=False,
    )
    try:
        yield Stack(nats_server, cost, inference, router)
    finally:
        await router.stop()
        await inference.stop()
        await cost.stop()


async def send(stack: Stack, count: int, tag: str) -> tuple[dict[str, list[int]], list[float]]:
    """`count` completions alternating between the tenants; per tenant the (input, output,
    requests) totals the clients were told, and every request's latency in ms."""
    sent = {tenant: [0, 0, 0] for tenant in TENANT_KEYS}
    latencies: list[float] = []
    clients = {tenant: stack.client(tenant) for tenant in TENANT_KEYS}
    for i in range(count):
        tenant = "tenant-a" if i % 2 == 0 else "tenant-b"
        started = time.perf_counter()
        reply = await clients[tenant].chat.completions.create(
            model=DEMO, messages=[{"role": "user", "content": f"{tag} request {i}: ROMEO:"}], max_tokens=4,
        )
        latencies.append((time.perf_counter() - started) * 1000)
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        totals = sent[tenant]
        totals[0] += reply.usage.prompt_tokens
        totals[1] += reply.usage.completion_tokens
        totals[2] += 1
    for client in clients.values():
        await client.close()
    return sent, latencies


async def ledger(stack: Stack) -> dict[str, list[int]]:
    """Per tenant (input tokens, output tokens, requests), read over the cost gRPC API as FinOps."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.cost.port}") as channel:
        report = await cost_grpc.CostServiceStub(channel).GetCostReport(
            cost_pb.GetCostReportRequest(group_by=[cost_pb.COST_DIMENSION_TENANT], page_size=100),
            metadata=[("authorization", "Bearer key-finops")], timeout=10,
        )
    return {row.keys[0].value: [row.input_tokens + row.cached_input_tokens, row.output_tokens, row.requests]
            for row in report.rows}


def add(a: dict[str, list[int]], b: dict[str, list[int]]) -> dict[str, list[int]]:
    return {tenant: [x + y for x, y in zip(a[tenant], b[tenant], strict=True)] for tenant in a}


async def settled(stack: Stack, expected: dict[str, list[int]], timeout: float = 120.0) -> dict[str, list[int]]:
    """The ledger once it equals `expected` (or the last value read when it never does)."""
    deadline = time.monotonic() + timeout
    seen = await ledger(stack)
    while seen != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        seen = await ledger(stack)
    return seen


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def test_a_nats_outage_loses_no_usage_and_does_not_slow_requests(stack: Stack) -> None:
    up_sent, _ = await send(stack, WITH_NATS_UP, "up")
    assert await settled(stack, up_sent) == up_sent

    await asyncio.to_thread(stack.nats.stop)
    down_sent, down_latency = await send(stack, DURING_OUTAGE, "down")
    # Nothing could have reached the ledger: the usage waits in the services' outboxes (the
    # router writes its completed event just after the reply, so the last one may still be on its way).
    assert stack.router.publisher is not None and stack.router.publisher.depth >= 2 * DURING_OUTAGE - 1
    assert stack.inference.publisher is not None and stack.inference.publisher.depth >= DURING_OUTAGE - 1
    assert await ledger(stack) == up_sent

    await asyncio.to_thread(stack.nats.start)
    expected = add(up_sent, down_sent)
    assert await settled(stack, expected) == expected
    await asyncio.sleep(1.0)  # any duplicate would land by now
    assert await ledger(stack) == expected, "a re-published event was counted twice"

    # the same number of requests with NATS up and the stack warm, to compare latency like for like
    after_sent, after_latency = await send(stack, DURING_OUTAGE, "after")
    expected = add(expected, after_sent)
    assert await settled(stack, expected) == expected

    p50_up, p99_up = percentile(after_latency, 0.5), percentile(after_latency, 0.99)
    p50_down, p99_down = percentile(down_latency, 0.5), percentile(down_latency, 0.99)
    print(
        f"\nlatency ms, NATS up ({len(after_latency)} requests): p50 {p50_up:.1f} p99 {p99_up:.1f}; "
        f"NATS down ({len(down_latency)} requests): p50 {p50_down:.1f} p99 {p99_down:.1f}; "
        f"p99 difference (down - up) {p99_down - p99_up:+.1f} ms"
    )
