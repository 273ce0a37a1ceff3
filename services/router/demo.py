"""`make demo` step: the live path as a user drives it.

Each tenant's OpenAI client (the official `openai` SDK, the tenant's API key) sends chat
completions to the router's HTTP port, the router routes them to the inference service,
and the demo then reads the cost ledger over gRPC and shows those very requests charged
to the tenant that sent them (and to nobody else, the router's own tenant included).

The report is grouped by request id (`COST_DIMENSION_REQUEST_ID`): the table pairs the
request id the router answered (the completion `id`, also its `x-request-id` header) with
the ledger row of that id.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import openai
from openai.types.chat import ChatCompletionMessageParam
from rich.console import RenderableType
from rich.table import Table

from llmo.core.client import create_channel, outgoing_metadata
from llmo.cost.money import format_usd
from llmo.protos.cost.v1 import cost_service_pb2 as cost_pb
from llmo.protos.cost.v1 import cost_service_pb2_grpc as cost_grpc

PROMPTS = ("ROMEO:", "JULIET:", "First Citizen:", "KING RICHARD II:", "MERCUTIO:", "HAMLET:")
MAX_TOKENS = 16
LEDGER_WAIT_S = 30.0
# The tenant `llmo up` gives the router's own service key (llmo.cli.stack.ROUTER_SERVICE_TENANT).
ROUTER_TENANT = "llmo-router"


@dataclass(frozen=True)
class Sent:
    """One completion as the client saw it."""

    request_id: str
    tenant: str
    user: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    streamed: bool
    text: str


@dataclass(frozen=True)
class LedgerRow:
    tenant: str
    request_id: str
    model: str
    route_reason: str
    requests: int
    prompt_tokens: int  # input + cached input: what the client's `usage.prompt_tokens` counts
    output_tokens: int
    cost_micros: int


def client_for(router_http: str, api_key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{router_http.rstrip('/')}/v1", api_key=api_key or "none", max_retries=0, timeout=120)


async def complete(client: openai.AsyncOpenAI, tenant: str, user: str, prompt: str, *, seed: int, stream: bool) -> Sent:
    """One chat completion through the router; the request id is the router's `x-request-id`."""
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": prompt}]
    if not stream:
        raw = await client.chat.completions.with_raw_response.create(
            model="auto", messages=messages, max_tokens=MAX_TOKENS, seed=seed, user=user
        )
        reply = raw.parse()
        if reply.usage is None or raw.request_id != reply.id:
            raise RuntimeError(f"router reply {reply.id!r} lacks usage or disagrees with x-request-id {raw.request_id!r}")
        return Sent(reply.id, tenant, user, reply.model, reply.usage.prompt_tokens, reply.usage.completion_tokens, False,
                    reply.choices[0].message.content or "")
    raw_stream = await client.chat.completions.with_raw_response.create(
        model="auto", messages=messages, max_tokens=MAX_TOKENS, seed=seed, user=user,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = raw_stream.parse()
    text: list[str] = []
    usage = None
    model = ""
    async for chunk in chunks:
        model = chunk.model or model
        if chunk.id != raw_stream.request_id:
            raise RuntimeError(f"stream chunk id {chunk.id!r} disagrees with x-request-id {raw_stream.request_id!r}")
        text.extend(c.delta.content or "" for c in chunk.choices)
        usage = chunk.usage or usage
    if usage is None or raw_stream.request_id is None:
        raise RuntimeError("the router's stream ended without usage or without an x-request-id")
    return Sent(raw_stream.request_id, tenant, user, model, usage.prompt_tokens, usage.completion_tokens, True, "".join(text))


async def ledger_rows(cost_target: str, api_key: str) -> list[LedgerRow]:
    """Every ledger group by tenant, request id, model and route reason the key may see (all pages)."""
    group_by = [cost_pb.COST_DIMENSION_TENANT, cost_pb.COST_DIMENSION_REQUEST_ID, cost_pb.COST_DIMENSION_MODEL,
                cost_pb.COST_DIMENSION_ROUTE_REASON]
    rows: list[LedgerRow] = []
    token = ""
    async with create_channel(cost_target) as channel:
        stub = cost_grpc.CostServiceStub(channel)
        while True:
            report = await stub.GetCostReport(
                cost_pb.GetCostReportRequest(group_by=group_by, page_size=1000, page_token=token),
                metadata=outgoing_metadata(api_key or None), timeout=10,
            )
            for row in report.rows:
                tenant, request_id, model, reason = (k.value for k in row.keys)
                rows.append(LedgerRow(tenant, request_id, model, reason, row.requests, row.input_tokens + row.cached_input_tokens, row.output_tokens,
                                      row.cost.micros))
            token = report.next_page_token
            if not token:
                return rows


def reconcile(sent: Sequence[Sent], rows: Sequence[LedgerRow]) -> list[str]:
    """What is wrong with how the ledger charged `sent` (empty when each completion is one
    request of its own tenant, with the tokens its client was told)."""
    problems = []
    for s in sent:
        mine = [r for r in rows if r.request_id == s.request_id]
        if not mine:
            problems.append(f"{s.request_id} ({s.tenant}) is not in the ledger")
            continue
        if len(mine) > 1 or mine[0].requests != 1:
            charged = ", ".join(f"{r.tenant} x{r.requests}" for r in mine)
            problems.append(f"{s.request_id} ({s.tenant}) is charged more than once: {charged}")
            continue
        row = mine[0]
        if row.tenant != s.tenant:
            problems.append(f"{s.request_id} was sent by {s.tenant} but charged to {row.tenant}")
        if (row.prompt_tokens, row.output_tokens) != (s.prompt_tokens, s.completion_tokens):
            problems.append(f"{s.request_id}: the ledger has {row.prompt_tokens}+{row.output_tokens} tokens, "
                            f"the client was told {s.prompt_tokens}+{s.completion_tokens}")
        if row.model != s.model:
            problems.append(f"{s.request_id}: the ledger has model {row.model!r}, the client was told {s.model!r}")
    return problems


async def settled_rows(cost_target: str, api_key: str, sent: Sequence[Sent], timeout: float = LEDGER_WAIT_S) -> list[LedgerRow]:
    """The ledger once the router's event of every sent completion is in (the router's event
    fills the route reason; the inference service's event of the same call has none)."""
    ids = {s.request_id for s in sent}
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        rows = await ledger_rows(cost_target, api_key)
        routed = {r.request_id for r in rows if r.request_id in ids and r.route_reason}
        if routed == ids or asyncio.get_running_loop().time() > deadline:
            return rows
        await asyncio.sleep(0.25)


def ledger_table(sent: Sequence[Sent], rows: Sequence[LedgerRow]) -> Table:
    table = Table(title="the cost ledger (over gRPC) for these requests", title_justify="left")
    table.add_column("request id", no_wrap=True)
    for name in ("sent by", "charged to", "model"):
        table.add_column(name)
    table.add_column("tokens", justify="right")
    table.add_column("cost", justify="right")
    by_id = {r.request_id: r for r in rows}
    for s in sent:
        row = by_id.get(s.request_id)
        if row is None:
            table.add_row(s.request_id, s.tenant, "[red]missing[/]", "-", "-", "-")
        else:
            table.add_row(s.request_id, s.tenant, row.tenant, row.model, f"{row.prompt_tokens}+{row.output_tokens}",
                          format_usd(row.cost_micros, 6))
    return table


def tenant_totals(rows: Sequence[LedgerRow], request_ids: set[str]) -> dict[str, tuple[int, int]]:
    """(requests, micro-USD) per tenant over the rows of these requests."""
    totals: dict[str, tuple[int, int]] = {}
    for r in rows:
        if r.request_id in request_ids:
            requests, micros = totals.get(r.tenant, (0, 0))
            totals[r.tenant] = (requests + r.requests, micros + r.cost_micros)
    return totals


async def send_all(router_http: str, tenants: Mapping[str, str], run: str) -> list[Sent]:
    """Three completions from the first tenant (the last one streamed), two from each other."""
    sent: list[Sent] = []
    prompts = iter(PROMPTS * 4)
    for index, (tenant, key) in enumerate(tenants.items()):
        count = 3 if index == 0 else 2
        async with client_for(router_http, key) as client:
            for i in range(count):
                user = f"demo-{run}-{tenant}-{i}"
                sent.append(await complete(client, tenant, user, next(prompts), seed=len(sent), stream=i == count - 1))
    return sent


async def run_demo(
    endpoints: dict[str, str], *, tenants: Mapping[str, str] | None = None, admin_key: str = ""
) -> list[RenderableType]:
    """`tenants` maps each end tenant to its API key (empty: API keys off, one default tenant);
    `admin_key` reads every tenant's ledger rows (an admin tenant's key)."""
    for needed in ("router_http", "inference", "cost"):
        if needed not in endpoints:
            raise RuntimeError(f"the router demo needs the router, inference and cost services running ({needed} is not)")
    tenants = dict(tenants or {"default": ""})
    run = secrets.token_hex(3)
    lines: list[RenderableType] = []
    sent = await send_all(endpoints["router_http"], tenants, run)
    for s in sent:
        preview = " ".join(s.text.split())[:32]
        lines.append(f"router: {s.tenant}{' (stream)' if s.streamed else ''} -> {s.model}: {preview!r}")
    try:
        rows = await settled_rows(endpoints["cost"], admin_key, sent)
    except grpc.aio.AioRpcError as error:
        raise RuntimeError(f"reading the cost ledger failed: {error.code().name} {error.details()}") from error
    lines.append(ledger_table(sent, rows))
    problems = reconcile(sent, rows)
    if problems:
        raise RuntimeError("the ledger does not match what was sent: " + "; ".join(problems))
    totals = tenant_totals(rows, {s.request_id for s in sent})
    for tenant in [*tenants, ROUTER_TENANT]:
        requests, micros = totals.get(tenant, (0, 0))
        who = f"{tenant} (the router's key)" if tenant == ROUTER_TENANT else tenant
        lines.append(f"cost: {who} charged for {requests} of them, {format_usd(micros, 6)}")
    # A tenant's own key sees its own rows only.
    for tenant, key in tenants.items():
        if key:
            own = {r.tenant for r in await ledger_rows(endpoints["cost"], key)}
            if own - {tenant}:
                raise RuntimeError(f"{tenant}'s key sees other tenants' ledger rows: {sorted(own - {tenant})}")
    streamed = sum(s.streamed for s in sent)
    lines.append(
        f"[green]router -> inference -> cost ledger: {len(sent)} completions ({streamed} streamed), "
        f"each charged once, to the tenant that sent it[/]"
    )
    return lines
