"""The usage consumer's failure handling against a real nats-server and SQLite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from llmo.core.events import EventBus
from llmo.core.natsd import NatsServer
from llmo.cost.engine import CostEngine
from llmo.cost.ingest import INFERENCE, UsageConsumer
from llmo.cost.prices import load_catalog
from llmo.cost.records import LedgerRecord
from llmo.cost.storage import BatchOutcome, CostStore
from llmo.protos.common.v1 import common_pb2
from llmo.protos.events.v1 import events_pb2


class FlakyEngine(CostEngine):
    """Fails every batch holding a poison event, and the first `outage` batches of all."""

    def __init__(self, store: CostStore, outage: int = 0, poison: str = "") -> None:
        super().__init__(store, load_catalog())
        self.outage = outage
        self.poison = poison

    async def ingest(self, records: Sequence[LedgerRecord]) -> BatchOutcome:
        if self.outage > 0:
            self.outage -= 1
            raise ConnectionError("database unavailable")
        if any(r.event_id == self.poison for r in records):
            raise ValueError("row rejected by the database")
        return await super().ingest(records)


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[EventBus]:
    async with EventBus(nats_server.url) as connected:
        yield connected


async def publish(bus: EventBus, ids: list[str]) -> None:
    for event_id in ids:
        event = events_pb2.InferenceCompleted(
            event_id=event_id, model="gpt-4o", attribution=common_pb2.Attribution(tenant="t"), usage=common_pb2.Usage(input_tokens=1000)
        )
        event.occurred_at.FromDatetime(datetime.now(UTC).replace(tzinfo=None))
        await bus.publish(event)


async def run_until(store: CostStore, count: int) -> None:
    for _ in range(600):
        if store.ledger_totals()[0] >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"ledger never reached {count} records")


async def test_an_outage_delays_but_loses_nothing(bus: EventBus, tmp_path: Path) -> None:
    store = CostStore.open(f"sqlite:///{tmp_path / 'c.db'}")
    consumer = UsageConsumer(bus, FlakyEngine(store, outage=7), INFERENCE, "cost-outage", batch=10, max_deliver=3, backoff=(0.01,))
    await publish(bus, [f"o{i}" for i in range(5)])
    await consumer.start()
    try:
        await run_until(store, 5)
    finally:
        await consumer.stop()
    assert store.ledger_totals() == (5, 5 * 2500)
    info = await bus.js.stream_info("LLMO_DLQ")
    assert info.state.messages == 0


async def test_a_record_the_database_refuses_is_dead_lettered_and_the_rest_commit(bus: EventBus, tmp_path: Path) -> None:
    store = CostStore.open(f"sqlite:///{tmp_path / 'c.db'}")
    consumer = UsageConsumer(bus, FlakyEngine(store, poison="p2"), INFERENCE, "cost-poison", batch=10, max_deliver=2, backoff=(0.01,))
    await bus.ensure_dlq()
    dlq = await bus.js.pull_subscribe("llmo.dlq.inference", durable="t", stream="LLMO_DLQ")
    await publish(bus, [f"p{i}" for i in range(5)])
    await consumer.start()
    try:
        await run_until(store, 4)
        letters = [events_pb2.DeadLetter.FromString(m.data) for m in await dlq.fetch(1, timeout=10)]
    finally:
        await consumer.stop()
    assert [(letter.event_id, letter.reason, letter.consumer) for letter in letters] == [("p2", "storage_error", "cost-poison")]
    assert "row rejected" in letters[0].detail
    assert store.ledger_totals() == (4, 4 * 2500)
    assert store.get_record("p2") is None


async def test_the_service_serves_without_nats_and_consumes_once_it_is_up(nats_server: NatsServer, tmp_path: Path) -> None:
    import grpc

    from llmo.cost.main import start
    from llmo.cost.settings import CostSettings
    from llmo.protos.cost.v1 import cost_service_pb2 as pb
    from llmo.protos.cost.v1 import cost_service_pb2_grpc as pb_grpc

    nats_server.stop()
    settings = CostSettings(
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        metrics_port=-1,
        nats_connect_timeout_s=1.0,
        platform={"nats_url": nats_server.url, "data_dir": tmp_path, "drain_seconds": 0.5},
    )
    running = await start(settings, port=0, metrics=False)
    try:
        assert running.bus is not None and not running.bus.connected
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            check = await pb_grpc.CostServiceStub(channel).CheckBudget(pb.CheckBudgetRequest(tenant="t", model="gpt-4o"))
            assert check.decision == pb.BUDGET_DECISION_ALLOW
        nats_server.start()
        async with EventBus(nats_server.url) as publisher:
            await publish(publisher, ["late-1"])
        await run_until(running.engine.store, 1)
        assert running.bus is not None and len(running.consumers) == 2
    finally:
        await running.stop()


async def test_an_event_delivered_too_often_is_parked_not_dropped(bus: EventBus, tmp_path: Path) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    store = CostStore.open(f"sqlite:///{tmp_path / 'c.db'}")
    await bus.ensure_dlq()
    dlq = await bus.js.pull_subscribe("llmo.dlq.inference", durable="t-max", stream="LLMO_DLQ")
    await publish(bus, ["crashy"])
    # two earlier consumers took the event and died without acking it
    config = ConsumerConfig(
        durable_name="cost-max", ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
        filter_subject="llmo.inference.v1.completed", ack_wait=0.5, max_deliver=-1,
    )
    await bus.js.add_consumer("LLMO_INFERENCE", config)
    dying = await bus.js.pull_subscribe("llmo.inference.v1.completed", durable="cost-max", stream="LLMO_INFERENCE")
    for _ in range(2):
        assert len(await dying.fetch(1, timeout=5)) == 1
        await asyncio.sleep(0.7)
    await dying.unsubscribe()
    consumer = UsageConsumer(bus, CostEngine(store, load_catalog()), INFERENCE, "cost-max", batch=10, ack_wait=0.5, max_deliver=2)
    await consumer.start()
    try:
        letters = [events_pb2.DeadLetter.FromString(m.data) for m in await dlq.fetch(1, timeout=10)]
    finally:
        await consumer.stop()
    assert [(letter.event_id, letter.reason, letter.deliveries) for letter in letters] == [("crashy", "max_deliveries_exceeded", 3)]
    assert store.ledger_totals() == (0, 0)
