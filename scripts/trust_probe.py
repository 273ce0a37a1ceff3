"""Issue 13's twelve reproductions, re-run against the real embedded stack.

Starts the stack exactly as `llmo up --random-ports` does (`llmo.cli.stack.Stack`: nats-server
and every implemented service as its own process, on free ports, in a temporary data directory)
with the keys of the issue (`k1=tenantA, k2=tenantB`, the router's service key `kr=router`, a
FinOps admin key `kf=finops`, `LLMO_ADMIN_TENANTS=router,finops`), then runs each reproduction
over real HTTP and gRPC and prints what was sent, what came back and PASS/FAIL against the
fixed behaviour.

    python scripts/trust_probe.py              # table; exit 0 only when every probe passes
    python scripts/trust_probe.py --json       # one JSON object on stdout
    python scripts/trust_probe.py --only 1,6   # some probes
    python scripts/trust_probe.py --no-timing  # latencies are reported, not judged

Ledger reads go through `GetCostReport` as the FinOps admin, filtered by an application label
unique to each probe and run, so each probe sees only its own rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from google.protobuf import timestamp_pb2

from llmo.cli.stack import Stack
from llmo.core.errors import error_info
from llmo.core.logging import configure_logging
from llmo.protos.common.v1 import common_pb2
from llmo.protos.cost.v1 import cost_service_pb2 as cost_pb
from llmo.protos.cost.v1 import cost_service_pb2_grpc as cost_grpc

KEYS = {"k1": "tenantA", "k2": "tenantB", "kr": "router", "kf": "finops"}
ADMIN_TENANTS = "router,finops"
# The router's own key is chosen (not minted by `llmo up`) so its tenant is `router`, as in the issue.
ROUTER_KEY_ENV = {"LLMO_ROUTER_INFERENCE_API_KEY": "kr", "LLMO_ROUTER_COST_API_KEY": "kr"}
BASE_ENV = {"LLMO_API_KEYS": ",".join(f"{k}={t}" for k, t in KEYS.items()), "LLMO_ADMIN_TENANTS": ADMIN_TENANTS}
STACK_ENV = {**BASE_ENV, **ROUTER_KEY_ENV}
DEMO_MODEL = "llmo-demo"
LEDGER_TIMEOUT_S = 60.0
SMALL_TRAILERS = 4096  # bytes of gRPC trailing metadata an error may carry (gRPC's limit is 16 KB)
GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Check:
    sent: str
    observed: str
    expected: str
    ok: bool


@dataclass
class ProbeResult:
    number: int
    title: str
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and bool(self.checks) and all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


# ---------------------------------------------------------------------------------------------
# The stack and clients


@dataclass
class Reply:
    """One HTTP answer."""

    status: int
    headers: dict[str, str]
    body: Any  # parsed JSON, or None when the answer was not JSON
    text: str  # the first characters of a non-JSON answer
    seconds: float

    @property
    def is_json(self) -> bool:
        return self.body is not None

    @property
    def error(self) -> dict[str, Any]:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return self.body["error"]
        return {}

    @property
    def content(self) -> str:
        try:
            return str(self.body["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            return ""

    @property
    def cache_hit(self) -> bool | None:
        try:
            return bool(self.body["llmo"]["cache_hit"])
        except (KeyError, TypeError):
            return None

    def brief(self) -> str:
        if self.status == 0:
            return f"no answer ({self.text})"
        if self.error:
            e = self.error
            rid = "request_id ok" if e.get("request_id") and e.get("request_id") == self.headers.get("x-request-id") else (
                f"request_id={e.get('request_id')!r}")
            return f"{self.status} {e.get('code')} param={e.get('param')!r} {rid}: {str(e.get('message'))[:80]!r}"
        if not self.is_json:
            return f"{self.status} non-JSON {self.headers.get('content-type', '')!r}: {self.text[:60]!r}"
        return f"{self.status}"

    def is_json_4xx(self) -> bool:
        """A client error with an OpenAI error body carrying the request id of the answer."""
        e = self.error
        return (400 <= self.status < 500 and bool(e.get("code")) and bool(e.get("request_id"))
                and e.get("request_id") == self.headers.get("x-request-id"))


@dataclass
class RpcOutcome:
    """One gRPC answer: the response, or the status with its ErrorInfo."""

    response: Any
    code: grpc.StatusCode
    reason: str = ""
    has_error_info: bool = False
    trailer_bytes: int = 0
    message: str = ""

    def brief(self) -> str:
        if self.code == grpc.StatusCode.OK:
            return "OK"
        info = f"ErrorInfo {self.reason}" if self.has_error_info else "no ErrorInfo"
        return f"{self.code.name} {info}, trailers {self.trailer_bytes} B"

    def is_bounded_error(self, code: grpc.StatusCode, reasons: Sequence[str] = ()) -> bool:
        return (self.code == code and self.has_error_info and self.trailer_bytes <= SMALL_TRAILERS
                and (not reasons or self.reason in reasons))


@dataclass
class Target:
    """The running stack and what the probes need to talk to it."""

    data_dir: Path
    stack: Stack
    session: aiohttp.ClientSession
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    timing: bool = True
    env: dict[str, str] = field(default_factory=lambda: dict(STACK_ENV))
    _channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    def http(self, service: str) -> str:
        return self.stack.state.services[service].http

    def app(self, probe: str) -> str:
        """An application label unique to this probe and run (ledger reads filter by it)."""
        return f"probe{probe}-{self.nonce}"

    def cost(self) -> cost_grpc.CostServiceStub:
        address = self.stack.state.services["cost"].grpc
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        return cost_grpc.CostServiceStub(self._channels[address])

    async def restart(self, env: dict[str, str]) -> None:
        """Stop the stack and start it again on the same data directory, on new free ports."""
        await self._close_channels()
        await self.stack.stop()
        self.env = dict(env)
        self.stack = Stack(self.data_dir, random_ports=True, env=self.env)
        await self.stack.start()

    async def _close_channels(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def close(self) -> None:
        await self._close_channels()
        await self.session.close()
        await self.stack.stop()


async def start_target(data_dir: Path, *, timing: bool = True) -> Target:
    stack = Stack(data_dir, random_ports=True, env=dict(STACK_ENV))
    await stack.start()
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
    return Target(data_dir=data_dir, stack=stack, session=session, timing=timing)


async def post(t: Target, service: str, body: Any = None, *, raw: bytes | None = None, key: str = "k1",
               headers: dict[str, str] | None = None, path: str = "/v1/chat/completions") -> Reply:
    data = raw if raw is not None else json.dumps(body).encode()
    sent = {"authorization": f"Bearer {key}", "content-type": "application/json", **(headers or {})}
    return await _http(t, "POST", t.http(service) + path, sent, data)


async def get(t: Target, service: str, path: str, *, key: str = "k1") -> Reply:
    return await _http(t, "GET", t.http(service) + path, {"authorization": f"Bearer {key}"}, None)


async def _http(t: Target, method: str, url: str, headers: dict[str, str], data: bytes | None) -> Reply:
    start = time.monotonic()
    try:
        async with t.session.request(method, url, data=data, headers=headers) as resp:
            raw = await resp.read()
            got = {k.lower(): v for k, v in resp.headers.items()}
            body = None
            if resp.content_type == "application/json":
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
            return Reply(resp.status, got, body, raw[:200].decode(errors="replace"), time.monotonic() - start)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return Reply(0, {}, None, f"{type(exc).__name__}: {exc}"[:200], time.monotonic() - start)


def chat_body(content: str, *, model: str = "auto", max_tokens: int = 16, application: str = "",
              skip_cache: bool = True, llmo: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
    ext: dict[str, Any] = {"skip_cache": skip_cache, **(llmo or {})}
    if application:
        ext["application"] = application
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "llmo": ext, **params}


async def chat(t: Target, content: str, *, key: str = "k1", headers: dict[str, str] | None = None,
               **kwargs: Any) -> Reply:
    return await post(t, "router", chat_body(content, **kwargs), key=key, headers=headers)


async def gather_limited(limit: int, coros: Sequence[Awaitable[Reply]]) -> list[Reply]:
    gate = asyncio.Semaphore(limit)

    async def one(c: Awaitable[Reply]) -> Reply:
        async with gate:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))


def metadata(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


async def rpc(t: Target, method: str, request: Any, *, key: str) -> RpcOutcome:
    call = getattr(t.cost(), method)
    try:
        return RpcOutcome(await call(request, metadata=metadata(key), timeout=60), grpc.StatusCode.OK)
    except grpc.aio.AioRpcError as err:
        info = error_info(err)
        trailers = err.trailing_metadata() or ()
        size = sum(len(k) + len(v) for k, v in trailers)
        return RpcOutcome(None, err.code(), info.reason if info else "", info is not None, size,
                          (err.details() or "")[:120])


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=int(seconds))


@dataclass
class Totals:
    requests: int = 0
    tokens: int = 0
    cost_micros: int = 0


async def ledger(t: Target, *, application: str = "", tenant: str = "") -> dict[str, Totals]:
    """Per-tenant totals of the ledger over the last two days (read as the FinOps admin)."""
    now = time.time()
    out: dict[str, Totals] = {}
    token = ""
    while True:
        request = cost_pb.GetCostReportRequest(
            start_time=timestamp(now - 2 * 86400), end_time=timestamp(now + 3600),
            group_by=[cost_pb.COST_DIMENSION_TENANT], application=application, tenant=tenant,
            page_size=1000, page_token=token)
        reply = await t.cost().GetCostReport(request, metadata=metadata("kf"), timeout=30)
        for row in reply.rows:
            out[row.keys[0].value] = Totals(row.requests, row.input_tokens + row.cached_input_tokens + row.output_tokens,
                                            row.cost.micros)
        token = reply.next_page_token
        if not token:
            return out


async def settled_ledger(t: Target, application: str, expected: dict[str, int],
                         timeout: float = LEDGER_TIMEOUT_S) -> dict[str, Totals]:
    """The ledger of one application once its per-tenant request counts reach `expected` (or the
    timeout passes), read again a moment later so late or duplicated rows show up too."""
    deadline = time.monotonic() + timeout
    rows = await ledger(t, application=application)
    while time.monotonic() < deadline:
        if all(rows.get(k, Totals()).requests >= n for k, n in expected.items()):
            break
        await asyncio.sleep(0.5)
        rows = await ledger(t, application=application)
    await asyncio.sleep(1.0)
    return await ledger(t, application=application)


def counts(rows: dict[str, Totals]) -> dict[str, int]:
    return {k: v.requests for k, v in sorted(rows.items())}


def usage_tokens(replies: Sequence[Reply]) -> int:
    return sum(int(r.body["usage"]["total_tokens"]) for r in replies if r.status == 200 and r.is_json)


def statuses(replies: Sequence[Reply]) -> str:
    tally: dict[str, int] = {}
    for r in replies:
        label = f"{r.status} {r.error.get('code')}" if r.error else str(r.status)
        tally[label] = tally.get(label, 0) + 1
    return ", ".join(f"{n}× {label}" for label, n in sorted(tally.items()))


def usage_record(event_id: str, *, application: str, request_id: str = "", input_tokens: int = 100,
                 output_tokens: int = 50, latency: common_pb2.Latency | None = None) -> cost_pb.UsageRecord:
    return cost_pb.UsageRecord(
        event_id=event_id, request_id=request_id, model=DEMO_MODEL,
        attribution=common_pb2.Attribution(application=application),
        usage=common_pb2.Usage(input_tokens=input_tokens, output_tokens=output_tokens),
        latency=latency or common_pb2.Latency(ttft_ms=12.0, e2e_ms=40.0))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


# ---------------------------------------------------------------------------------------------
# The twelve reproductions


async def probe_billing(t: Target) -> list[Check]:
    checks = []
    app = t.app("1")
    router_before = (await ledger(t, tenant="router")).get("router", Totals()).requests
    replies = await gather_limited(8, [chat(t, f"Tell me about item number {i}.", key="k2", application=app)
                                       for i in range(100)])
    ok = [r for r in replies if r.status == 200]
    checks.append(Check(f"100 × POST router /v1/chat/completions as k2 (tenantB), llmo.application={app}",
                        statuses(replies), "100× 200", len(ok) == 100))
    rows = await settled_ledger(t, app, {"tenantB": len(ok)})
    checks.append(Check("GetCostReport as finops, application filter, grouped by tenant",
                        f"rows per tenant {counts(rows)}", f"{{'tenantB': {len(ok)}}} (none to router)",
                        counts(rows) == {"tenantB": len(ok)}))
    billed = rows.get("tenantB", Totals()).tokens
    checks.append(Check("the same report: tokens (input + cached input + output)", f"{billed} tokens billed to tenantB",
                        f"{usage_tokens(ok)} (the sum of the answers' usage)", billed == usage_tokens(ok)))
    router_after = (await ledger(t, tenant="router")).get("router", Totals()).requests
    checks.append(Check("GetCostReport tenant=router (whole ledger)", f"router rows {router_before} -> {router_after}",
                        "unchanged", router_after == router_before))

    # A hard budget for tenantB is not overrun: the ledger charges tenantB, so its budget sees the spend.
    per_call = max(1, math.ceil(rows["tenantB"].cost_micros / max(1, rows["tenantB"].requests))) if ok else 1
    limit = 10 * per_call
    app_b = t.app("1b")
    budget_id = f"p1-{t.nonce}"
    created = await rpc(t, "CreateBudget", cost_pb.CreateBudgetRequest(budget_id=budget_id, budget=cost_pb.Budget(
        tenant="tenantB", application=app_b, window=cost_pb.BUDGET_WINDOW_DAILY,
        hard_limit=common_pb2.Money(micros=limit))), key="k2")
    checks.append(Check(f"CreateBudget {budget_id} as k2: tenantB, application {app_b}, hard limit {limit} micro-USD "
                        f"(~10 calls at {per_call})", created.brief(), "OK", created.code == grpc.StatusCode.OK))
    sent: list[Reply] = []
    for i in range(40):  # one at a time: admission may pass the limit by the last admitted call only
        sent.append(await chat(t, f"Budgeted question {i}?", key="k2", application=app_b))
        if len(sent) >= 3 and all(r.status == 429 for r in sent[-3:]):
            break
    ok_b = [r for r in sent if r.status == 200]
    denied = [r for r in sent if r.status == 429 and r.error.get("code") == "BUDGET_EXCEEDED"]
    checks.append(Check(f"up to 40 calls as k2 with application {app_b}, one at a time", statuses(sent),
                        "some 200, then 429 BUDGET_EXCEEDED", bool(ok_b) and bool(denied)))
    rows_b = await settled_ledger(t, app_b, {"tenantB": len(ok_b)})
    status = await rpc(t, "GetBudget", cost_pb.GetBudgetRequest(name=f"budgets/{budget_id}"), key="k2")
    spent = status.response.status.spent.micros if status.response else -1
    cost = rows_b.get("tenantB", Totals()).cost_micros
    checks.append(Check("GetBudget as k2, GetCostReport for the application",
                        f"ledger {counts(rows_b)}, {cost} micro-USD; budget spent {spent} of {limit}",
                        f"all billed to tenantB; spent = ledger; spent <= limit + one call ({limit + per_call})",
                        counts(rows_b) == {"tenantB": len(ok_b)} and spent == cost and 0 < spent <= limit + per_call))
    return checks


async def probe_request_ids(t: Target) -> list[Check]:
    checks = []
    app = t.app("2")
    reused = f"reuse-{t.nonce}"
    replies = [await chat(t, f"Reused id question {i}", key="k2", application=app, headers={"x-request-id": reused})
               for i in range(10)]
    ids = {r.body.get("id") for r in replies if r.status == 200}
    echoed = sum(r.headers.get("x-client-request-id") == reused for r in replies)
    checks.append(Check(f"10 × router chat as k2 with x-request-id: {reused}",
                        f"{statuses(replies)}; {len(ids)} distinct response ids; client id echoed {echoed}×",
                        "10× 200, 10 platform-minted ids (none the client's)",
                        len(ids) == 10 and reused not in ids and all(r.status == 200 for r in replies)))
    rows = await settled_ledger(t, app, {"tenantB": 10})
    billed = rows.get("tenantB", Totals()).tokens
    checks.append(Check("GetCostReport for that application", f"{counts(rows)}, {billed} tokens",
                        f"{{'tenantB': 10}}, {usage_tokens(replies)} tokens",
                        counts(rows) == {"tenantB": 10} and billed == usage_tokens(replies)))

    app_x = t.app("2x")
    shared = f"shared-{t.nonce}"
    first = await chat(t, "Whose request is this?", key="k1", application=app_x, headers={"x-request-id": shared})
    second = await chat(t, "Whose request is this?", key="k2", application=app_x, headers={"x-request-id": shared})
    rows_x = await settled_ledger(t, app_x, {"tenantA": 1, "tenantB": 1})
    checks.append(Check(f"k1 then k2 (tenantB reuses tenantA's id) with x-request-id: {shared}",
                        f"{first.brief()} / {second.brief()}; ledger {counts(rows_x)}",
                        "200 / 200; {'tenantA': 1, 'tenantB': 1}",
                        first.status == second.status == 200 and counts(rows_x) == {"tenantA": 1, "tenantB": 1}))

    app_r = t.app("2r")
    event, request_id = f"ev-{t.nonce}", f"rq-{t.nonce}"

    def record() -> cost_pb.RecordUsageRequest:
        return cost_pb.RecordUsageRequest(records=[usage_record(event, application=app_r, request_id=request_id)])

    a = await rpc(t, "RecordUsage", record(), key="k1")
    b = await rpc(t, "RecordUsage", record(), key="k2")
    b_again = await rpc(t, "RecordUsage", record(), key="k2")

    def dup(o: RpcOutcome) -> str:
        return f"duplicate={o.response.results[0].duplicate}" if o.response else o.brief()

    rows_r = await ledger(t, application=app_r)
    checks.append(Check(f"RecordUsage event_id={event} as k1, then as k2, then as k2 again",
                        f"{dup(a)} / {dup(b)} / {dup(b_again)}; ledger {counts(rows_r)}",
                        "false / false / true; {'tenantA': 1, 'tenantB': 1}",
                        [dup(a), dup(b), dup(b_again)] == ["duplicate=False", "duplicate=False", "duplicate=True"]
                        and counts(rows_r) == {"tenantA": 1, "tenantB": 1}))
    return checks


async def probe_breaker(t: Target) -> list[Check]:
    checks = []
    bad_inputs: list[tuple[str, dict[str, Any]]] = [
        ('"temperature": -1', {"temperature": -1}),
        ('"presence_penalty": 0.5 (forwarded; inference refuses it)', {"presence_penalty": 0.5}),
    ]
    for label, params in bad_inputs:
        replies = [await chat(t, "Hello?", key="k1", **params) for _ in range(6)]
        checks.append(Check(f"6 × router chat as k1 (tenantA) with {label}", statuses(replies), "6× 4xx JSON",
                            all(r.is_json_4xx() for r in replies)))
    long_prompt = "lorem ipsum dolor sit amet " * 4000
    replies = [await chat(t, long_prompt, key="k1") for _ in range(6)]
    checks.append(Check(f"6 × router chat as k1 with a {len(long_prompt) // 1000} kB prompt (over the context)",
                        statuses(replies), "6× 400 CONTEXT_TOO_LONG",
                        all(r.is_json_4xx() and r.error.get("code") == "CONTEXT_TOO_LONG" for r in replies)))
    valid = await chat(t, "A valid question from tenantB.", key="k2")
    checks.append(Check("then one valid router chat as k2 (tenantB)", valid.brief(), "200", valid.status == 200))
    return checks


async def probe_cache(t: Target) -> list[Check]:
    checks = []
    app = t.app("4")
    prompt = f"Describe the harbour at dawn, note {t.nonce}."

    async def ask(key: str = "k1", **params: Any) -> Reply:
        return await chat(t, prompt, key=key, application=app, skip_cache=False, temperature=0, **params)

    base = await ask()
    again = await ask()
    checks.append(Check("router chat as k1, temperature 0, twice (cache on)",
                        f"{base.brief()} cache_hit={base.cache_hit} {base.content!r}; again cache_hit={again.cache_hit}",
                        "200, then a cache hit (the cache is on)", base.status == 200 and again.cache_hit is True))
    text = base.content
    stop = "N" if "N" in text[1:] else next((c for c in text[1:] if c.isalnum()), "N")
    with_stop = await ask(stop=[stop])
    checks.append(Check(f'the same with "stop": [{stop!r}] (a string in the cached answer)',
                        f"{with_stop.brief()} cache_hit={with_stop.cache_hit} {with_stop.content!r}",
                        f"not from the cache; no {stop!r} in the answer",
                        with_stop.status == 200 and with_stop.cache_hit is False and stop not in with_stop.content))
    variants: list[tuple[str, dict[str, Any]]] = [("top_p 0.5", {"top_p": 0.5}), ("seed 7", {"seed": 7}),
                                                  ("top_k 3", {"top_k": 3}), ("max_tokens 8", {"max_tokens": 8})]
    for label, params in variants:
        reply = await ask(**params)
        checks.append(Check(f"the same with {label}", f"{reply.brief()} cache_hit={reply.cache_hit}",
                            "200, not from the cache", reply.status == 200 and reply.cache_hit is False))
    other = await ask(key="k2")
    checks.append(Check("the first request again as k2 (tenantB)", f"{other.brief()} cache_hit={other.cache_hit}",
                        "200, not tenantA's cached answer", other.status == 200 and other.cache_hit is False))
    return checks


async def _with_models_meanwhile(t: Target, big: Awaitable[Reply]) -> tuple[Reply, list[Reply]]:
    task = asyncio.ensure_future(big)
    await asyncio.sleep(0.05)
    models: list[Reply] = []
    while not task.done() and len(models) < 50:
        models.append(await get(t, "router", "/v1/models"))
    if not models:  # the big request was answered first: still show /v1/models answers
        models.append(await get(t, "router", "/v1/models"))
    return await task, models


async def probe_large_body(t: Target) -> list[Check]:
    checks = []
    for label, content, want_status, want_code in [
        ("10 MB", "word " * 2_000_000, 413, "BODY_TOO_LARGE"),
        ("3.5 MB (under the 4 MiB bound)", "word " * 700_000, 400, "CONTEXT_TOO_LONG"),
    ]:
        raw = json.dumps(chat_body(content)).encode()
        reply, models = await _with_models_meanwhile(t, post(t, "router", raw=raw))
        worst = max(m.seconds for m in models)
        fast = worst < 2.0 and reply.seconds < 10.0
        ok = (reply.status == want_status and reply.error.get("code") == want_code and reply.is_json_4xx()
              and all(m.status == 200 for m in models) and (fast or not t.timing))
        checks.append(Check(
            f"router chat as k1 with a {label} body ({len(raw) / 1e6:.1f} MB); GET /v1/models meanwhile",
            f"{reply.brief()} in {ms(reply.seconds)}; /v1/models {statuses(models)}, slowest {ms(worst)}",
            f"{want_status} {want_code}; /v1/models 200 meanwhile" + (" (< 2 s; the big one < 10 s)" if t.timing else ""),
            ok))
    return checks


async def probe_nats_outage(t: Target) -> list[Check]:
    checks = []
    app = t.app("6")
    up = [await chat(t, f"Question with NATS up {i}", key="k2", application=app) for i in range(10)]
    await asyncio.to_thread(t.stack.nats.stop)
    try:
        down = [await chat(t, f"Question with NATS down {i}", key="k2", application=app) for i in range(20)]
    finally:
        await asyncio.to_thread(t.stack.nats.start)
    p50_up = statistics.median(r.seconds for r in up)
    p50_down = statistics.median(r.seconds for r in down)
    worst = max(r.seconds for r in down)
    fast = p50_down <= p50_up + 1.0 and worst < 5.0
    checks.append(Check("10 router chats as k2 with NATS up, then nats-server stopped and 20 more",
                        f"up: {statuses(up)}, p50 {ms(p50_up)}; down: {statuses(down)}, p50 {ms(p50_down)}, "
                        f"slowest {ms(worst)}",
                        "all 200; the outage adds no wait" + (" (p50 within 1 s of NATS up, none over 5 s)" if t.timing else ""),
                        all(r.status == 200 for r in up + down) and (fast or not t.timing)))
    sent = sum(r.status == 200 for r in up + down)
    rows = await settled_ledger(t, app, {"tenantB": sent}, timeout=90)
    billed = rows.get("tenantB", Totals()).tokens
    checks.append(Check("nats-server restarted on its port; GetCostReport for the application",
                        f"rows per tenant {counts(rows)}", f"{{'tenantB': {sent}}} (nothing lost or doubled)",
                        counts(rows) == {"tenantB": sent}))
    checks.append(Check("the same report: tokens (input + cached input + output)", f"{billed} tokens billed",
                        f"{usage_tokens(up + down)} (the sum of the answers' usage)", billed == usage_tokens(up + down)))
    return checks


async def _portfolio_follows(t: Target, label: str, app: str) -> list[Check]:
    path = t.data_dir / "router" / "portfolio.yaml"
    text = path.read_text() if path.exists() else ""
    port = t.http("inference").rsplit(":", 1)[1]
    generated = text.startswith("# llmo-router generated")
    follows = f"127.0.0.1:{port}/v1" in text
    keyed = "api_key_env: LLMO_ROUTER_INFERENCE_API_KEY" in text
    reply = await chat(t, "Is the router working?", key="k1", application=app)
    rows = await settled_ledger(t, app, {"tenantA": 1})
    return [
        Check(f"{label}: read <data_dir>/router/portfolio.yaml",
              f"generated={generated}, base_url on inference's port {port}={follows}, api_key_env set={keyed}",
              "generated, on inference's current port, with api_key_env", generated and follows and keyed),
        Check(f"{label}: router chat as k1", f"{reply.brief()}; ledger {counts(rows)}", "200; {'tenantA': 1}",
              reply.status == 200 and counts(rows) == {"tenantA": 1}),
    ]


async def probe_portfolio(t: Target) -> list[Check]:
    checks = await _portfolio_follows(t, "keys on", t.app("7a"))
    configured = dict(t.env)
    before = t.http("inference")
    # A plain `llmo up --random-ports` with keys: the stack mints the router's service key itself.
    await t.restart(BASE_ENV)
    checks.append(Check("restart on the same data dir, random ports, LLMO_API_KEYS only (llmo up mints the router key)",
                        f"inference {before} -> {t.http('inference')}", "the stack is up", True))
    checks += await _portfolio_follows(t, "after restart (minted key)", t.app("7b"))
    await t.restart(configured)
    checks += await _portfolio_follows(t, "after a second restart (router key kr)", t.app("7c"))
    return checks


async def probe_budget_ids(t: Target) -> list[Check]:
    checks = []
    budget_id = f"a-secret-{t.nonce}"

    def budget(hard: int) -> cost_pb.Budget:
        return cost_pb.Budget(window=cost_pb.BUDGET_WINDOW_MONTHLY, hard_limit=common_pb2.Money(micros=hard))

    a = await rpc(t, "CreateBudget", cost_pb.CreateBudgetRequest(budget_id=budget_id, budget=budget(1_000_000)), key="k1")
    b = await rpc(t, "CreateBudget", cost_pb.CreateBudgetRequest(budget_id=budget_id, budget=budget(5)), key="k2")
    checks.append(Check(f'CreateBudget(budget_id="{budget_id}") as k1, then the same id as k2',
                        f"{a.brief()} / {b.brief()}", "OK / OK (per-tenant namespace, no ALREADY_EXISTS)",
                        a.code == b.code == grpc.StatusCode.OK))
    got_b = await rpc(t, "GetBudget", cost_pb.GetBudgetRequest(name=f"budgets/{budget_id}"), key="k2")
    got_a = await rpc(t, "GetBudget", cost_pb.GetBudgetRequest(name=f"budgets/{budget_id}"), key="k1")

    def owner(o: RpcOutcome) -> str:
        if not o.response:
            return o.brief()
        return f"{o.response.budget.tenant} hard {o.response.budget.hard_limit.micros}"

    checks.append(Check("GetBudget(budgets/<id>) as k2, then as k1", f"{owner(got_b)} / {owner(got_a)}",
                        "tenantB hard 5 / tenantA hard 1000000",
                        (owner(got_b), owner(got_a)) == ("tenantB hard 5", "tenantA hard 1000000")))
    probe = await rpc(t, "GetBudget", cost_pb.GetBudgetRequest(name=f"budgets/{budget_id}", tenant="tenantA"), key="k2")
    checks.append(Check("GetBudget(budgets/<id>, tenant=tenantA) as k2", probe.brief(),
                        "PERMISSION_DENIED ErrorInfo TENANT_FORBIDDEN",
                        probe.is_bounded_error(grpc.StatusCode.PERMISSION_DENIED, ["TENANT_FORBIDDEN"])))
    for label, method, request in [
        ("CreateBudget(budget_id = 100 kB)", "CreateBudget",
         cost_pb.CreateBudgetRequest(budget_id="b" * 100_000, budget=budget(5))),
        ('GetBudget(name = "budgets/" + 3 MB)', "GetBudget", cost_pb.GetBudgetRequest(name="budgets/" + "x" * 3_000_000)),
        ("RecordUsage(event_id = 3 MB)", "RecordUsage",
         cost_pb.RecordUsageRequest(records=[usage_record("e" * 3_000_000, application=t.app("8"))])),
    ]:
        outcome = await rpc(t, method, request, key="k2")
        checks.append(Check(f"{label} as k2", outcome.brief(),
                            f"INVALID_ARGUMENT with ErrorInfo, trailers <= {SMALL_TRAILERS} B",
                            outcome.is_bounded_error(grpc.StatusCode.INVALID_ARGUMENT)))
    return checks


def _bad_http_inputs(model: str) -> list[tuple[str, bytes]]:
    msgs = [{"role": "user", "content": "hi"}]
    deep = b'{"model": ' + json.dumps(model).encode() + b', "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    return [
        ('lone surrogate "content": "\\ud800x"',  # json.dumps writes the lone surrogate as the escape \ud800
         json.dumps({"model": model, "messages": [{"role": "user", "content": "\ud800x"}]}).encode()),
        ('"stream": true, "stream_options": "x"',
         json.dumps({"model": model, "messages": msgs, "stream": True, "stream_options": "x"}).encode()),
        ("5,000-deep nested arrays as messages", deep),
        ('"stop": 5', json.dumps({"model": model, "messages": msgs, "stop": 5}).encode()),
    ]


async def probe_http_500s(t: Target) -> list[Check]:
    checks = []
    for service, model in (("router", "auto"), ("inference", DEMO_MODEL)):
        for label, raw in _bad_http_inputs(model):
            reply = await post(t, service, raw=raw)
            checks.append(Check(f"{service} POST /v1/chat/completions as k1: {label}", reply.brief(),
                                "4xx JSON error with the request id", reply.is_json_4xx()))
    return checks


async def probe_cost_internal(t: Target) -> list[Check]:
    checks = []
    app = t.app("10")
    now = time.time()
    cases: list[tuple[str, str, Any, str]] = [
        ("RecordUsage(input_tokens = 2**62)", "RecordUsage", cost_pb.RecordUsageRequest(
            records=[usage_record(f"e10a-{t.nonce}", application=app, input_tokens=2**62)]), "INVALID_USAGE"),
        ("GetCostReport(start_time.seconds = -10**12)", "GetCostReport", cost_pb.GetCostReportRequest(
            start_time=timestamp_pb2.Timestamp(seconds=-10**12), end_time=timestamp(now)), "INVALID_TIME_RANGE"),
        ("Forecast(end_time = 9999-12-31)", "Forecast", cost_pb.ForecastRequest(
            end_time=timestamp_pb2.Timestamp(seconds=253402214400)), "INVALID_TIME_RANGE"),
        ("RecordUsage(latency.e2e_ms = NaN)", "RecordUsage", cost_pb.RecordUsageRequest(records=[usage_record(
            f"e10b-{t.nonce}", application=app, latency=common_pb2.Latency(ttft_ms=5.0, e2e_ms=math.nan))]),
         "INVALID_USAGE"),
        ("RecordUsage(latency.ttft_ms = inf)", "RecordUsage", cost_pb.RecordUsageRequest(records=[usage_record(
            f"e10c-{t.nonce}", application=app, latency=common_pb2.Latency(ttft_ms=math.inf, e2e_ms=50.0))]),
         "INVALID_USAGE"),
    ]
    for label, method, request, reason in cases:
        outcome = await rpc(t, method, request, key="k1")
        checks.append(Check(f"{label} as k1", outcome.brief(), f"INVALID_ARGUMENT ErrorInfo {reason}",
                            outcome.is_bounded_error(grpc.StatusCode.INVALID_ARGUMENT, [reason])))
    good = await rpc(t, "RecordUsage", cost_pb.RecordUsageRequest(
        records=[usage_record(f"e10d-{t.nonce}", application=app)]), key="k1")
    report = await rpc(t, "GetCostReport", cost_pb.GetCostReportRequest(
        start_time=timestamp(now - 86400), end_time=timestamp(now + 3600), group_by=[cost_pb.COST_DIMENSION_TENANT]),
        key="k1")
    numbers = [(row.latency_p50_ms, row.latency_p95_ms, row.ttft_p50_ms, row.ttft_p95_ms)
               for row in (report.response.rows if report.response else [])]
    finite = bool(numbers) and all(math.isfinite(x) for row in numbers for x in row)
    checks.append(Check("a valid RecordUsage, then GetCostReport as k1 (tenantA's whole ledger)",
                        f"{good.brief()} / {report.brief()}: (p50, p95, ttft p50, ttft p95) ms = {numbers}",
                        "OK / every latency percentile finite",
                        good.code == grpc.StatusCode.OK and finite))
    return checks


async def probe_batch_duplicates(t: Target) -> list[Check]:
    app = t.app("11")
    event = f"e11-{t.nonce}"
    outcome = await rpc(t, "RecordUsage", cost_pb.RecordUsageRequest(
        records=[usage_record(event, application=app) for _ in range(5)]), key="k1")
    flags = [r.duplicate for r in outcome.response.results] if outcome.response else []
    rows = await ledger(t, application=app)
    return [Check(f"RecordUsage as k1 with five copies of event_id {event} in one batch",
                  f"{outcome.brief()}, duplicate flags {flags}; ledger {counts(rows)}",
                  "[False, True, True, True, True]; {'tenantA': 1}",
                  flags == [False, True, True, True, True] and counts(rows) == {"tenantA": 1})]


def _refused(reply: Reply, param: str) -> bool:
    return reply.is_json_4xx() and reply.error.get("param") == param


async def probe_parameters(t: Target) -> list[Check]:
    checks = []
    prompt = f"Say something about the weather ({t.nonce})."

    async def router(**params: Any) -> Reply:
        return await chat(t, prompt, **params)

    refused: list[tuple[str, dict[str, Any], str]] = [
        ("n=1000", {"n": 1000}, "n"),
        ("top_k=-1", {"top_k": -1}, "top_k"),
        ('llmo.strong_share=5', {"llmo": {"strong_share": 5}}, "llmo.strong_share"),
        ("llmo.policy=42", {"llmo": {"policy": 42}}, "llmo.policy"),
    ]
    for label, params, param in refused:
        reply = await router(**params)
        checks.append(Check(f"router chat as k1 with {label}", reply.brief(), f"400 param={param!r}",
                            _refused(reply, param)))
    greedy = await router(temperature=0)
    top1 = await router(temperature=1.5, top_k=1, seed=99)
    checks.append(Check("router chat temperature 0, then temperature 1.5 with top_k=1 (honoured: greedy again)",
                        f"{greedy.content!r} / {top1.content!r}", "200 / 200, the same text",
                        greedy.status == top1.status == 200 and greedy.content == top1.content))
    seeded = [await router(temperature=1.5, seed=1234) for _ in range(2)]
    checks.append(Check("router chat temperature 1.5 with seed=1234, twice (honoured: the same text)",
                        " / ".join(repr(r.content) for r in seeded), "200 / 200, the same text",
                        all(r.status == 200 for r in seeded) and seeded[0].content == seeded[1].content))
    presence = await router(presence_penalty=0.5)
    checks.append(Check("router chat with presence_penalty=0.5 (inference has no presence penalty)",
                        presence.brief(), "4xx param='presence_penalty' (refused, not dropped)",
                        _refused(presence, "presence_penalty")))
    huge = await chat(t, "a" * 3_000_000)
    checks.append(Check("router chat with a 3 MB one-word message", huge.brief(), "4xx JSON (not 503)",
                        huge.is_json_4xx()))

    # json.dumps writes inf as the JSON extension `Infinity`, and 1e9 as a float
    inference_refused: list[tuple[str, dict[str, Any], str]] = [
        ("temperature=Infinity", {"temperature": math.inf}, "temperature"),
        ("stop_token_ids=[-1, 1e9]", {"stop_token_ids": [-1, 1e9]}, "stop_token_ids"),
        ("stop_token_ids=[-1, 1000000000]", {"stop_token_ids": [-1, 1_000_000_000]}, "stop_token_ids"),
        ("top_k=2**31-1", {"top_k": 2**31 - 1}, "top_k"),
        ("seed=2**64", {"seed": 2**64}, "seed"),
        ("max_tokens=2**40", {"max_tokens": 2**40}, "max_tokens"),
    ]
    for label, params, param in inference_refused:
        body = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "hi"}], **params}
        reply = await post(t, "inference", body)
        checks.append(Check(f"inference chat as k1 with {label}", reply.brief(), f"400 param={param!r}",
                            _refused(reply, param)))
    huge_inf = await post(t, "inference", {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "a" * 3_000_000}]})
    checks.append(Check("inference chat with a 3 MB one-word message", huge_inf.brief(), "4xx JSON (not 503)",
                        huge_inf.is_json_4xx()))
    return checks


Probe = Callable[[Target], Awaitable[list[Check]]]
PROBES: dict[int, tuple[str, Probe]] = {
    1: ("router calls are billed to the end tenant; its hard budget holds", probe_billing),
    2: ("the platform mints the exactly-once key, not the client", probe_request_ids),
    3: ("one tenant's bad requests do not open the shared breaker", probe_breaker),
    4: ("the response cache keys every parameter that changes the answer", probe_cache),
    5: ("large bodies are bounded and do not stall the router", probe_large_body),
    6: ("a NATS outage does not block router requests or lose usage", probe_nats_outage),
    7: ("the generated portfolio works with keys and across restarts", probe_portfolio),
    8: ("budget ids are per tenant and bounded; errors are bounded", probe_budget_ids),
    9: ("bad HTTP input is a 4xx JSON error with a request id", probe_http_500s),
    10: ("bad numbers and times are INVALID_ARGUMENT in cost", probe_cost_internal),
    11: ("RecordUsage flags duplicates within one batch", probe_batch_duplicates),
    12: ("parameters are honoured or refused, naming the field", probe_parameters),
}


async def run_probe(t: Target, number: int) -> ProbeResult:
    title, probe = PROBES[number]
    result = ProbeResult(number, title)
    start = time.monotonic()
    try:
        result.checks = await probe(t)
    except Exception as exc:  # a probe that breaks is a FAIL with its cause, and the others still run
        result.error = f"{type(exc).__name__}: {exc}"[:500] + "\n" + traceback.format_exc(limit=3)[-1500:]
    result.seconds = time.monotonic() - start
    return result


async def run_all(numbers: Sequence[int], *, data_dir: Path, timing: bool = True) -> tuple[list[ProbeResult], float]:
    start = time.monotonic()
    target = await start_target(data_dir, timing=timing)
    try:
        results = [await run_probe(target, n) for n in numbers]
    finally:
        await target.close()
    return results, time.monotonic() - start


# ---------------------------------------------------------------------------------------------
# Output


def print_table(results: Sequence[ProbeResult], seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="issue 13 reproductions against the running stack", show_lines=True, expand=True)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("reproduction", ratio=2)
    table.add_column("sent", ratio=3)
    table.add_column("came back", ratio=4)
    table.add_column("expected", ratio=3)
    table.add_column("result", no_wrap=True)
    for r in results:
        verdict = "[green]PASS[/green]" if r.passed else "[red]FAIL[/red]"
        rows = [(c.sent, c.observed, c.expected, "[green]ok[/green]" if c.ok else "[red]FAIL[/red]") for c in r.checks]
        if r.error:
            rows.append(("(probe raised)", r.error, "no exception", "[red]FAIL[/red]"))
        for i, (sent, observed, expected, ok) in enumerate(rows):
            head = (str(r.number), f"{r.title}\n{verdict} in {r.seconds:.1f} s") if i == 0 else ("", "")
            table.add_row(*head, sent, observed, expected, ok)
    console = Console(width=220)
    console.print(table)
    passed = sum(r.passed for r in results)
    console.print(f"{passed}/{len(results)} reproductions PASS in {seconds:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="One JSON object on stdout instead of the table.")
    parser.add_argument("--only", default="", help="Comma-separated probe numbers (default: all twelve).")
    parser.add_argument("--data-dir", type=Path, help="Stack data directory (default: a temporary one, removed after).")
    parser.add_argument("--no-timing", action="store_true", help="Report latencies without judging them.")
    args = parser.parse_args(argv)
    numbers = [int(n) for n in args.only.split(",") if n.strip()] or sorted(PROBES)
    unknown = sorted(set(numbers) - set(PROBES))
    if unknown:
        parser.error(f"no such probe: {unknown}")
    configure_logging("trust-probe", level="warning")
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="llmo-trust-probe-"))
    try:
        results, seconds = asyncio.run(run_all(numbers, data_dir=data_dir, timing=not args.no_timing))
    finally:
        if args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)
    passed = all(r.passed for r in results)
    if args.json:
        print(json.dumps({"passed": passed, "seconds": round(seconds, 1), "probes": [r.as_dict() for r in results]},
                         indent=2))
    else:
        print_table(results, seconds)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
