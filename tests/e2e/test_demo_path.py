"""The path `make demo` shows, asserted end to end: the embedded stack started as `llmo demo`
starts it (API keys on: two tenants, an admin, the router's minted service key), the official
`openai` client sending completions to the router's HTTP port as tenantA and tenantB, the
router routing them to the inference service, and every one of those request ids landing in
the cost ledger exactly once, under the tenant that sent it, with the tokens its client was told."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import openai
import pytest
import pytest_asyncio
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam
from rich.console import Console
from rich.table import Table

from llmo.cli.main import DEMO_ADMIN_TENANT, _demo_env, _demo_keys
from llmo.cli.stack import ROUTER_SERVICE_TENANT, Stack
from llmo.core.client import create_channel, outgoing_metadata
from llmo.protos.cost.v1 import cost_service_pb2 as cost_pb
from llmo.protos.cost.v1 import cost_service_pb2_grpc as cost_grpc
from llmo.router import demo as router_demo

pytestmark = pytest.mark.slow
in_stack_loop = pytest.mark.asyncio(loop_scope="module")

SERVICES = ["router", "inference", "cost"]
SENT_BY = {"tenantA": 4, "tenantB": 3}  # N and M; the last of each tenant's is streamed
USAGE_STREAMS = ("LLMO_ROUTER", "LLMO_INFERENCE")


@dataclass
class DemoStack:
    stack: Stack
    tenants: dict[str, str]
    admin_key: str

    @property
    def router_v1(self) -> str:
        return f"{self.stack.state.services['router'].http}/v1"

    @property
    def cost(self) -> str:
        return self.stack.state.services["cost"].grpc


@dataclass(frozen=True)
class Reply:
    request_id: str
    tenant: str
    user: str
    prompt_tokens: int
    completion_tokens: int


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def demo_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DemoStack]:
    tenants, admin_key = _demo_keys()
    stack = Stack(tmp_path_factory.mktemp("demo"), services=SERVICES, random_ports=True, env=_demo_env(tenants, admin_key))
    await stack.start()
    yield DemoStack(stack, tenants, admin_key)
    codes = await stack.stop()
    assert codes == {name: 0 for name in SERVICES}, f"a service did not drain and exit cleanly: {codes}"


async def one(client: openai.AsyncOpenAI, prompt: str, user: str, seed: int, stream: bool) -> tuple[str, CompletionUsage]:
    """(the router's request id, the usage it reported) of one completion."""
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": prompt}]
    if not stream:
        raw = await client.chat.completions.with_raw_response.create(
            model="auto", messages=messages, max_tokens=8, seed=seed, user=user
        )
        reply = raw.parse()
        assert raw.request_id and reply.id == raw.request_id, "the completion id is the router's x-request-id"
        assert reply.usage is not None
        return raw.request_id, reply.usage
    raw_stream = await client.chat.completions.with_raw_response.create(
        model="auto", messages=messages, max_tokens=8, seed=seed, user=user, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in raw_stream.parse()]
    assert raw_stream.request_id and {chunk.id for chunk in chunks} == {raw_stream.request_id}
    usage = chunks[-1].usage
    assert usage is not None
    return raw_stream.request_id, usage


async def send(demo: DemoStack, tenant: str, count: int, tag: str) -> list[Reply]:
    replies = []
    async with openai.AsyncOpenAI(base_url=demo.router_v1, api_key=demo.tenants[tenant], max_retries=0, timeout=120) as client:
        for i in range(count):
            user = f"{tag}-{tenant}-{i}"
            request_id, usage = await one(client, f"ROMEO {i}:", user, seed=i, stream=i == count - 1)
            assert usage.completion_tokens > 0
            replies.append(Reply(request_id, tenant, user, usage.prompt_tokens, usage.completion_tokens))
    return replies


async def report(demo: DemoStack, key: str, *group_by: int) -> list[cost_pb.CostReportRow]:
    async with create_channel(demo.cost) as channel:
        reply = await cost_grpc.CostServiceStub(channel).GetCostReport(
            cost_pb.GetCostReportRequest(group_by=list(group_by), page_size=1000), metadata=outgoing_metadata(key), timeout=10
        )
    assert not reply.next_page_token
    return list(reply.rows)


async def events_drained(demo: DemoStack) -> bool:
    """Every usage event published so far has been committed to the ledger and acked."""
    nc = await nats.connect(demo.stack.state.nats_url)
    try:
        js = nc.jetstream()
        for stream in USAGE_STREAMS:
            for consumer in await js.consumers_info(stream):
                if consumer.num_pending or consumer.num_ack_pending:
                    return False
        return True
    finally:
        await nc.close()


async def settle(demo: DemoStack, request_ids: set[str], timeout: float = 60.0) -> None:
    """Until the router's event of every reply is in the ledger (it fills the route reason) and
    no usage event of either service is still waiting to be ingested."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = await report(demo, demo.admin_key, cost_pb.COST_DIMENSION_REQUEST_ID, cost_pb.COST_DIMENSION_ROUTE_REASON)
        routed = {r.keys[0].value for r in rows if r.keys[1].value}
        if request_ids <= routed and await events_drained(demo):
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"not in the ledger after {timeout:.0f}s: {sorted(request_ids - routed)}")


def tenant_totals(rows: list[cost_pb.CostReportRow]) -> dict[str, tuple[int, int, int]]:
    return {r.keys[0].value: (r.requests, r.input_tokens + r.cached_input_tokens, r.output_tokens) for r in rows}


def ledger_rows_of(demo: DemoStack, request_ids: list[str]) -> list[tuple[str, str, int, int]]:
    """(request id, tenant, prompt tokens (input + cached), output tokens) of every ledger row of these requests,
    straight from the cost service's SQLite ledger (rows, not the report's groups)."""
    path = Path(demo.stack.data_dir) / "cost.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        marks = ",".join("?" * len(request_ids))
        query = (f"SELECT request_id, tenant, input_tokens + cached_input_tokens, output_tokens FROM usage_ledger "
                 f"WHERE request_id IN ({marks})")
        return [tuple(row) for row in db.execute(query, request_ids)]


@in_stack_loop
async def test_completions_through_the_router_are_charged_once_to_the_tenant_that_sent_them(demo_stack: DemoStack) -> None:
    tag = "e2e"
    # Whatever other tests sent is settled first, so the totals below move by exactly our traffic.
    await settle(demo_stack, set())
    before = tenant_totals(await report(demo_stack, demo_stack.admin_key, cost_pb.COST_DIMENSION_TENANT))

    replies = [r for tenant, count in SENT_BY.items() for r in await send(demo_stack, tenant, count, tag)]
    ids = [r.request_id for r in replies]
    assert len(set(ids)) == len(ids) == sum(SENT_BY.values())
    await settle(demo_stack, set(ids))

    # Each request id: exactly one ledger row, under its sender, with the tokens it was told.
    rows = ledger_rows_of(demo_stack, ids)
    assert sorted(rows) == sorted((r.request_id, r.tenant, r.prompt_tokens, r.completion_tokens) for r in replies)

    # The report API agrees, per request id and per tenant; the router's own tenant is charged nothing.
    by_request = await report(demo_stack, demo_stack.admin_key, cost_pb.COST_DIMENSION_REQUEST_ID,
                              cost_pb.COST_DIMENSION_TENANT)
    mine = sorted((r.keys[0].value, r.keys[1].value, r.requests, r.input_tokens + r.cached_input_tokens, r.output_tokens)
                  for r in by_request if r.keys[0].value in set(ids))
    assert mine == sorted((r.request_id, r.tenant, 1, r.prompt_tokens, r.completion_tokens) for r in replies)
    after = tenant_totals(await report(demo_stack, demo_stack.admin_key, cost_pb.COST_DIMENSION_TENANT))
    for tenant in SENT_BY:
        ours = [r for r in replies if r.tenant == tenant]
        was = before.get(tenant, (0, 0, 0))
        moved = tuple(b - a for a, b in zip(was, after[tenant], strict=True))
        assert moved == (len(ours), sum(r.prompt_tokens for r in ours), sum(r.completion_tokens for r in ours)), tenant
    assert ROUTER_SERVICE_TENANT not in after
    assert set(after) - set(before) <= set(SENT_BY)

    # A tenant's own key sees its own spend only.
    for tenant, key in demo_stack.tenants.items():
        assert set(tenant_totals(await report(demo_stack, key, cost_pb.COST_DIMENSION_TENANT))) == {tenant}


@in_stack_loop
async def test_the_router_demo_step_shows_the_ledger_rows_of_its_own_requests(demo_stack: DemoStack) -> None:
    endpoints = demo_stack.stack.state.endpoints()
    lines = await router_demo.run_demo(endpoints, tenants=demo_stack.tenants, admin_key=demo_stack.admin_key)
    (table,) = [line for line in lines if isinstance(line, Table)]
    console = Console(record=True, width=200)
    console.print(table)
    shown = [line.split("│")[1:4] for line in console.export_text().splitlines() if line.startswith("│")]
    shown_rows = [(request_id.strip(), sent_by.strip(), charged.strip()) for request_id, sent_by, charged in shown]
    assert len(shown_rows) == 5 and all(sent_by == charged for _, sent_by, charged in shown_rows)
    # The ids it shows are the ids the ledger holds, each once, under the tenant shown.
    ledger = ledger_rows_of(demo_stack, [request_id for request_id, _, _ in shown_rows])
    assert sorted((request_id, tenant) for request_id, tenant, _, _ in ledger) == sorted(
        (request_id, charged) for request_id, _, charged in shown_rows
    )
    assert any(isinstance(line, str) and "each charged once, to the tenant that sent it" in line for line in lines)


def test_llmo_demo_exits_0_with_a_success_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmo.cli.main", "demo", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=280, env={**_clean_env(), "COLUMNS": "160"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "demo failed" not in result.stdout
    assert "each charged once, to the tenant that sent it" in result.stdout
    assert f"{ROUTER_SERVICE_TENANT} (the router's key) charged for 0 of them" in result.stdout
    assert f"{DEMO_ADMIN_TENANT} (admin)" in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("demo OK")


def _clean_env() -> dict[str, str]:
    # The demo mints its own keys; an operator's own LLMO_* settings must not leak into it.
    return {k: v for k, v in os.environ.items() if not k.startswith("LLMO_")}
