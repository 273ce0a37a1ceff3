"""Real processes for the fault suite, and the two sides of the billing comparison.

`CostProcess` runs the cost service as its own subprocess (`llmo serve cost`) on a fixed
port and data dir, so a test can kill -9 it and start it again exactly where it was, with
no supervisor racing it. `Traffic` drives the router's OpenAI HTTP API from two tenants
and keeps what every response said; `read_ledger` reads what the cost service charged
over its gRPC API; `billed_from_responses` prices what the clients were told with the
ledger's own price of the model and its documented rounding (half up, once per call).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import grpc
from nats.aio.client import Client as NatsClient

from llmo.cli.stack import Stack, check_health
from llmo.core.events import DLQ_STREAM, domain_of, stream_name, subject_of
from llmo.core.natsd import free_port
from llmo.protos.cost.v1 import cost_service_pb2 as cost_pb
from llmo.protos.cost.v1 import cost_service_pb2_grpc as cost_grpc
from llmo.protos.events.v1 import events_pb2

# Ready, or a clear failure: a start-up or settle that takes longer than this is a defect.
DEADLINE_S = 60.0


@dataclass(frozen=True)
class Totals:
    """One tenant's usage: what its clients were told, or what the ledger charged."""

    requests: int = 0
    input_tokens: int = 0  # prompt tokens not served from a prefix cache (llmo.common.v1.Usage)
    cached_input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0

    def __add__(self, other: Totals) -> Totals:
        return Totals(
            self.requests + other.requests,
            self.input_tokens + other.input_tokens,
            self.cached_input_tokens + other.cached_input_tokens,
            self.output_tokens + other.output_tokens,
            self.cost_micros + other.cost_micros,
        )

    @classmethod
    def of_response(cls, usage: Mapping[str, Any], price: Price) -> Totals:
        """One call as an OpenAI `usage` tells it (`prompt_tokens` includes the cached ones)."""
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        uncached, output = int(usage["prompt_tokens"]) - cached, int(usage["completion_tokens"])
        return cls(1, uncached, cached, output, price.cost_micros(uncached, cached, output))


@dataclass(frozen=True)
class Price:
    """Micro-dollars per million tokens."""

    input: int
    cached_input: int
    output: int

    def cost_micros(self, input_tokens: int, cached_input_tokens: int, output_tokens: int) -> int:
        """One call's cost, rounded half up to a whole micro-dollar (the ledger's rule, once per call)."""
        numerator = input_tokens * self.input + cached_input_tokens * self.cached_input + output_tokens * self.output
        return (2 * numerator + 1_000_000) // 2_000_000


class CostProcess:
    """The cost service as a subprocess bound to one port and one data dir across restarts."""

    def __init__(self, data_dir: Path, env: Mapping[str, str]) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {
            **env,
            "LLMO_DATA_DIR": str(data_dir),
            "LLMO_COST_HOST": "127.0.0.1",
            "LLMO_COST_GRPC_PORT": str(self.port),
            "LLMO_COST_METRICS_PORT": "-1",
        }
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0

    async def start(self) -> None:
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        self._log = open(self.data_dir / "logs" / "cost.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llmo.cli.main", "serve", "cost"],
            env=self.env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.starts += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while await check_health(self.address) != "SERVING":
            assert self.process.poll() is None, f"cost exited with {self.process.returncode}; see {self._log.name}"
            assert loop.time() < deadline, f"cost not serving after {DEADLINE_S:.0f}s; see {self._log.name}"
            await asyncio.sleep(0.1)

    async def kill9(self) -> None:
        assert self.process is not None and self.process.poll() is None, "cost is not running"
        os.kill(self.process.pid, signal.SIGKILL)
        await asyncio.to_thread(self.process.wait)
        self._close_log()

    async def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            self._close_log()
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(self.process.wait, 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = await asyncio.to_thread(self.process.wait)
        self._close_log()
        return code

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


async def kill9_nats(stack: Stack) -> None:
    """SIGKILL the stack's nats-server: no flush, no goodbye to its clients."""
    process = stack.nats.process
    assert process is not None and process.poll() is None, "nats-server is not running"
    os.kill(process.pid, signal.SIGKILL)
    await asyncio.to_thread(process.wait)


async def restart_nats(stack: Stack) -> None:
    """Start nats-server again on the same port with the same JetStream store."""
    await asyncio.to_thread(stack.nats.start)


@dataclass
class Outcome:
    tenant: str
    valid: bool
    status: int
    usage: dict[str, Any]  # the 200 response's OpenAI usage; empty otherwise
    # the fault phase when the request was sent and when its answer came back
    sent_in: str
    answered_in: str


@dataclass
class Traffic:
    """Completions from several tenants through the router, `per_tenant` concurrent clients each."""

    base_url: str
    keys: Mapping[str, str]  # tenant -> API key
    limit: int  # requests in all, never more
    per_tenant: int = 2
    # every n-th request is one the router must refuse (temperature -1): it must not be billed
    invalid_every: int = 0
    phase: str = "warm"
    outcomes: list[Outcome] = field(default_factory=list)
    _issued: int = 0
    _stop: bool = False
    _progress: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        for tenant in self.keys:
            for worker in range(self.per_tenant):
                self._tasks.append(asyncio.create_task(self._worker(tenant, worker)))

    async def _worker(self, tenant: str, worker: int) -> None:
        assert self._session is not None
        # tenants differ in prompt and answer lengths, so a row charged to the wrong one shows
        long = list(self.keys).index(tenant) + 1
        while not self._stop and self._issued < self.limit:
            n = self._issued
            self._issued += 1
            words = " ".join(f"w{(n * 7 + j) % 97}" for j in range(4 * long + n % 9))
            body = {
                "model": "llmo-demo",
                "messages": [
                    # a tenant's fixed system prompt: its calls share a prefix inference serves from its cache
                    {"role": "system", "content": f"You are the assistant of {tenant}; answer as a player would. " * long},
                    {"role": "user", "content": f"{worker} request {n}: {words} ROMEO:"},
                ],
                "max_tokens": 2 + 3 * long + n % 5,
            }
            valid = not (self.invalid_every and n % self.invalid_every == self.invalid_every - 1)
            if not valid:
                body["temperature"] = -1
            sent_in = self.phase
            try:
                async with self._session.post(
                    f"{self.base_url}/v1/chat/completions", json=body,
                    headers={"authorization": f"Bearer {self.keys[tenant]}"},
                ) as reply:
                    status = reply.status
                    text = await reply.text()
            except (TimeoutError, aiohttp.ClientError):
                status, text = 0, ""
            usage = json.loads(text).get("usage") or {} if status == 200 else {}
            self.outcomes.append(Outcome(tenant, valid, status, usage, sent_in, self.phase))
            self._progress.set()

    async def wait_for(self, answered: int) -> None:
        """Until `answered` responses came back (of any status)."""
        assert answered <= self.limit
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while len(self.outcomes) < answered:
            self._progress.clear()
            remaining = deadline - loop.time()
            assert remaining > 0, f"only {len(self.outcomes)} of {answered} responses after {DEADLINE_S:.0f}s"
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except TimeoutError:
                continue

    async def finish(self) -> None:
        """Stop sending; wait for what is in flight."""
        self._stop = True
        await asyncio.gather(*self._tasks)
        if self._session is not None:
            await self._session.close()

    def answered_within(self, phase: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.sent_in == phase and o.answered_in == phase]

    def sent(self, price: Price) -> dict[str, Totals]:
        """Per tenant, what the 200 responses told the clients, priced as the ledger prices it."""
        sent = {tenant: Totals() for tenant in self.keys}
        for o in self.outcomes:
            if o.status == 200:
                sent[o.tenant] += Totals.of_response(o.usage, price)
        return sent


async def read_price(cost_address: str, api_key: str, model: str) -> Price:
    """The price the ledger applies to `model` now, from the cost service's own catalog."""
    async with grpc.aio.insecure_channel(cost_address) as channel:
        reply = await cost_grpc.CostServiceStub(channel).ListPrices(
            cost_pb.ListPricesRequest(model=model), metadata=[("authorization", f"Bearer {api_key}")], timeout=10
        )
    latest = max(reply.prices, key=lambda p: p.effective_time.seconds)
    return Price(latest.input_per_mtok.micros, latest.cached_input_per_mtok.micros, latest.output_per_mtok.micros)


async def read_ledger(cost_address: str, api_key: str) -> dict[str, Totals]:
    """Per tenant, what the ledger charged, as the caller of `api_key` may see it."""
    async with grpc.aio.insecure_channel(cost_address) as channel:
        report = await cost_grpc.CostServiceStub(channel).GetCostReport(
            cost_pb.GetCostReportRequest(group_by=[cost_pb.COST_DIMENSION_TENANT], page_size=100),
            metadata=[("authorization", f"Bearer {api_key}")], timeout=10,
        )
    assert not report.next_page_token
    return {
        row.keys[0].value: Totals(
            row.requests, row.input_tokens, row.cached_input_tokens, row.output_tokens, row.cost.micros
        )
        for row in report.rows
    }


async def settled_ledger(
    cost_address: str, api_key: str, settled: Callable[[dict[str, Totals]], bool]
) -> dict[str, Totals]:
    """The ledger once `settled(ledger)` holds, or as it stands after DEADLINE_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    seen = await read_ledger(cost_address, api_key)
    while not settled(seen) and loop.time() < deadline:
        await asyncio.sleep(0.25)
        seen = await read_ledger(cost_address, api_key)
    return seen


USAGE_SUBJECTS = (subject_of(events_pb2.InferenceCompleted), subject_of(events_pb2.RouterCompleted))


async def outbox_depths(stack: Stack) -> dict[str, float]:
    """`llmo_outbox_depth` of every stack service, from its Prometheus endpoint."""
    depths: dict[str, float] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for name, endpoint in stack.state.services.items():
            async with session.get(endpoint.metrics) as reply:
                text = await reply.text()
            for line in text.splitlines():
                if line.startswith("llmo_outbox_depth{"):
                    depths[name] = depths.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return depths


async def quiesced(stack: Stack, durables: Mapping[str, str]) -> dict[str, object]:
    """Wait until nothing is left to reach the ledger: every outbox empty, every usage
    consumer (subject -> durable) with nothing pending or unacknowledged. Returns what was
    last seen, plus the dead-letter count (events the ledger gave up on)."""
    nc = NatsClient()
    await nc.connect(stack.nats.url, connect_timeout=5, max_reconnect_attempts=3)
    try:
        js = nc.jetstream()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while True:
            depths = await outbox_depths(stack)
            pending: dict[str, tuple[int, int]] = {}
            for subject, durable in durables.items():
                info = await js.consumer_info(stream_name(domain_of(subject)), durable)
                pending[durable] = (info.num_pending or 0, info.num_ack_pending or 0)
            done = not any(depths.values()) and not any(sum(p) for p in pending.values())
            if done or loop.time() > deadline:
                break
            await asyncio.sleep(0.25)
        try:
            dead = (await js.stream_info(DLQ_STREAM)).state.messages
        except Exception:  # no DLQ stream: nothing was ever dead-lettered
            dead = 0
        return {"outbox_depths": depths, "consumer_pending": pending, "dead_lettered": dead, "quiet": done}
    finally:
        await nc.close()
