"""Exactly-once ledger under crashes, redelivery and re-published duplicates.

Real nats-server, real cost-service processes killed mid-stream, SQLite and
PostgreSQL. The ledger total must equal the events sent, to the micro-dollar.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path

import pytest

from llmo.core.events import EventBus
from llmo.core.natsd import NatsServer, free_port
from llmo.cost.budgets import Budget, Window, window_key
from llmo.cost.storage import CostStore
from llmo.protos.common.v1 import common_pb2
from llmo.protos.events.v1 import events_pb2

pytestmark = pytest.mark.slow

N_EVENTS = 4000
# $ per 1M tokens (input, cached input, output), written here independently of prices.yaml.
PRICES = {
    "gpt-4o-mini": (Fraction("0.15"), Fraction("0.075"), Fraction("0.60")),
    "gpt-4o": (Fraction("2.50"), Fraction("1.25"), Fraction("10.00")),
    "claude-haiku-4-5": (Fraction("1.00"), Fraction("0.10"), Fraction("5.00")),
}

# A consumer that commits its third batch and then dies before acking it.
CRASHING_CONSUMER = r"""
import asyncio, os, sys
from llmo.core.events import EventBus
from llmo.cost.engine import CostEngine
from llmo.cost.ingest import INFERENCE, UsageConsumer
from llmo.cost.prices import load_catalog
from llmo.cost.settings import CostSettings
from llmo.cost.storage import CostStore

async def main() -> None:
    settings = CostSettings()
    store = CostStore.open(settings.resolved_database_url())
    bus = await EventBus(settings.platform.nats_url).connect()
    engine = CostEngine(store, load_catalog(), bus)
    await engine.start()
    commits = 0
    ingest = engine.ingest
    async def crash_after_third_commit(records):
        nonlocal commits
        outcome = await ingest(records)
        commits += 1
        if commits == 3:
            os._exit(9)
        return outcome
    engine.ingest = crash_after_third_commit
    await UsageConsumer(bus, engine, INFERENCE, "cost-inference", batch=settings.ingest_batch,
                        ack_wait=settings.ack_wait_s, max_deliver=settings.max_deliver).start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


def expected_cost_micros(model: str, inp: int, cached: int, out: int) -> int:
    p_in, p_cached, p_out = PRICES[model]
    dollars = (inp * p_in + cached * p_cached + out * p_out) / 1_000_000
    return math.floor(dollars * 1_000_000 + Fraction(1, 2))


def make_events() -> list[events_pb2.InferenceCompleted]:
    rng = random.Random(7)
    now = datetime.now(UTC)
    events = []
    for i in range(N_EVENTS):
        event = events_pb2.InferenceCompleted(
            event_id=f"evt-{i:05d}",
            request_id=f"req-{i:05d}",
            attribution=common_pb2.Attribution(tenant="acme", application=rng.choice(["chat", "search"])),
            model=rng.choice(list(PRICES)),
            usage=common_pb2.Usage(input_tokens=rng.randint(1, 9000), cached_input_tokens=rng.randint(0, 3000), output_tokens=rng.randint(1, 2000)),
        )
        event.occurred_at.FromDatetime(now.replace(tzinfo=None))
        events.append(event)
    return events


async def publish_all(url: str, events: list[events_pb2.InferenceCompleted], msg_id_suffix: str = "") -> None:
    async with EventBus(url) as bus:
        await bus.ensure_stream("inference")
        for start in range(0, len(events), 500):
            chunk = events[start : start + 500]
            if msg_id_suffix:
                # a publisher that lost its ack and re-sent under a new message id: JetStream cannot dedupe it
                await asyncio.gather(
                    *(
                        bus.js.publish(
                            "llmo.inference.v1.completed",
                            e.SerializeToString(),
                            headers={"Nats-Msg-Id": e.event_id + msg_id_suffix, "llmo-type": "llmo.events.v1.InferenceCompleted"},
                        )
                        for e in chunk
                    )
                )
            else:
                await asyncio.gather(*(bus.publish(e) for e in chunk))


async def drained(url: str) -> bool:
    async with EventBus(url) as bus:
        info = await bus.js.consumer_info("LLMO_INFERENCE", "cost-inference")
        return info.num_pending == 0 and info.num_ack_pending == 0


@pytest.fixture
def env(database_url: str, nats_server: NatsServer, tmp_path: Path) -> Iterator[dict[str, str]]:
    yield {
        **os.environ,
        "LLMO_NATS_URL": nats_server.url,
        "LLMO_DATA_DIR": str(tmp_path),
        "LLMO_LOG_LEVEL": "warning",
        "LLMO_COST_DATABASE_URL": database_url,
        "LLMO_COST_GRPC_PORT": str(free_port()),
        "LLMO_COST_METRICS_PORT": "-1",
        "LLMO_COST_INGEST_BATCH": "50",
        "LLMO_COST_ACK_WAIT_S": "2",
    }


def spawn(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_until(check: object, timeout: float) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_ledger_totals_equal_events_sent_after_crashes_and_duplicates(env: dict[str, str], nats_server: NatsServer) -> None:
    store = CostStore.open(env["LLMO_COST_DATABASE_URL"])
    now = datetime.now(UTC)
    store.create_budget(Budget("acme-month", "acme", Window.MONTHLY, hard_limit_micros=10**12), now)
    events = make_events()
    expected = sum(
        expected_cost_micros(e.model, e.usage.input_tokens, e.usage.cached_input_tokens, e.usage.output_tokens) for e in events
    )
    asyncio.run(publish_all(nats_server.url, events))

    # 1. a consumer commits a batch and dies before acking it
    crashing = spawn(env, "-c", CRASHING_CONSUMER)
    assert crashing.wait(timeout=120) == 9, crashing.stderr.read().decode() if crashing.stderr else ""
    after_crash, _ = store.ledger_totals()
    assert 0 < after_crash < N_EVENTS

    # 2. the real service starts, and is SIGKILLed while it is still ingesting
    service = spawn(env, "-m", "llmo.cost.main")
    wait_until(lambda: store.ledger_totals()[0] > after_crash, timeout=120)
    service.send_signal(signal.SIGKILL)
    service.wait(timeout=30)
    after_kill, _ = store.ledger_totals()
    assert after_kill < N_EVENTS, "the service finished before it was killed; the kill was not mid-stream"

    # 3. publishers re-send: 1000 events under new message ids, 500 under the same ids
    asyncio.run(publish_all(nats_server.url, events[:1000], msg_id_suffix=":retry"))
    asyncio.run(publish_all(nats_server.url, events[1000:1500]))

    # 4. a fresh service gets the redeliveries and the duplicates, and drains the stream
    service = spawn(env, "-m", "llmo.cost.main")
    try:
        wait_until(lambda: store.ledger_totals()[0] == N_EVENTS and asyncio.run(drained(nats_server.url)), timeout=180)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=60)

    assert store.ledger_totals() == (N_EVENTS, expected)
    assert store.window_spend("acme/acme-month", window_key(datetime(now.year, now.month, 1, tzinfo=UTC))) == expected
    store.close()
