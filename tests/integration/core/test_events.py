"""The event bus against a real nats-server: exactly-once consumption,
dead letters with reasons, and surviving a server restart."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import nats.errors
import pytest

from llmo.core.events import Delivery, EventBus, subject_of
from llmo.core.natsd import NatsServer
from llmo.protos.common.v1 import common_pb2
from llmo.protos.events.v1 import events_pb2

from .ledger_consumer import open_ledger

ROOT = Path(__file__).resolve().parents[3]


def completed(i: int) -> events_pb2.InferenceCompleted:
    return events_pb2.InferenceCompleted(
        event_id=f"evt-{i:05d}", model="llmo-demo", usage=common_pb2.Usage(input_tokens=3, output_tokens=i)
    )


async def wait_until(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def test_subject_comes_from_the_message_option() -> None:
    assert subject_of(events_pb2.InferenceCompleted) == "llmo.inference.v1.completed"
    assert subject_of(events_pb2.BudgetThresholdCrossed) == "llmo.cost.v1.budget_threshold_crossed"


async def test_exactly_once_despite_crash_before_ack_and_publisher_retries(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    events = [completed(i) for i in range(200)]
    async with EventBus(nats_server.url) as bus:
        fresh = [await bus.publish(e) for e in events]
        # A publisher retrying after a lost ack re-sends the same ids: JetStream drops them.
        retried = [await bus.publish(e) for e in events[:50]]
    assert all(fresh) and not any(retried)

    db_path = tmp_path / "ledger.db"
    crashed = subprocess.run(
        [sys.executable, "-m", "tests.integration.core.ledger_consumer", nats_server.url, str(db_path),
         "--expected", "200", "--crash-after-commit"],
        cwd=ROOT, timeout=60,
    )
    assert crashed.returncode == 3, "the consumer should have died after its first commit"
    db = open_ledger(str(db_path))
    committed_before_crash = db.execute("SELECT COUNT(*) FROM ledger").fetchone()[0]
    assert 0 < committed_before_crash < 200

    subprocess.run(
        [sys.executable, "-m", "tests.integration.core.ledger_consumer", nats_server.url, str(db_path),
         "--expected", "200"],
        cwd=ROOT, timeout=60, check=True,
    )
    rows = db.execute("SELECT COUNT(*), SUM(tokens) FROM ledger").fetchone()
    assert rows == (200, sum(range(200)))


async def test_poison_and_failing_messages_go_to_the_dead_letter_subject(nats_server: NatsServer) -> None:
    handled: list[str] = []

    async def handle(batch: list[Delivery[events_pb2.InferenceCompleted]]) -> None:
        for delivery in batch:
            if delivery.event.model == "unknown-model":
                delivery.reject("unknown_model", f"no price for {delivery.event.model}")
            elif delivery.event.model == "always-fails":
                raise RuntimeError("handler bug")
        handled.extend(d.event_id for d in batch if d.rejection is None)

    async with EventBus(nats_server.url) as bus:
        await bus.ensure_stream("inference")
        await bus.ensure_dlq()
        dead = await bus.js.pull_subscribe("llmo.dlq.inference", durable="dlq-reader", stream="LLMO_DLQ")
        await bus.publish(completed(1))
        await bus.nc.publish(  # plain NATS publish of garbage bytes on the event subject
            "llmo.inference.v1.completed", b"\xff\xff not protobuf",
            headers={"Nats-Msg-Id": "garbage-1", "llmo-type": "llmo.events.v1.InferenceCompleted"},
        )
        await bus.nc.flush()
        await bus.publish(events_pb2.InferenceCompleted(event_id="unknown-1", model="unknown-model"))
        await bus.publish(events_pb2.InferenceCompleted(event_id="fails-1", model="always-fails"))
        await bus.publish(completed(2))

        consumer = bus.consumer(
            events_pb2.InferenceCompleted, "dlq-test", handle, max_deliver=3, backoff=(0.05,), ack_wait=2.0
        )
        consumer.start()
        letters: dict[str, events_pb2.DeadLetter] = {}

        async def read_letters() -> None:
            while len(letters) < 3:
                try:
                    for msg in await dead.fetch(10, timeout=0.5):
                        letter = events_pb2.DeadLetter.FromString(msg.data)
                        letters[letter.reason] = letter
                        await msg.ack()
                except Exception:  # fetch timeout while letters are on their way
                    await asyncio.sleep(0.05)

        await asyncio.wait_for(read_letters(), timeout=30)
        await wait_until(lambda: {"evt-00001", "evt-00002"} <= set(handled))
        await consumer.stop()

    assert set(letters) == {"malformed_payload", "unknown_model", "max_deliveries_exceeded"}
    assert letters["malformed_payload"].payload == b"\xff\xff not protobuf"
    assert letters["unknown_model"].event_id == "unknown-1"
    assert "no price" in letters["unknown_model"].detail
    assert letters["max_deliveries_exceeded"].event_id == "fails-1"
    assert letters["max_deliveries_exceeded"].deliveries == 3
    assert letters["max_deliveries_exceeded"].original_subject == "llmo.inference.v1.completed"
    assert handled.count("evt-00001") == 1 and handled.count("evt-00002") == 1


async def test_consumer_resumes_after_server_restart_without_losing_messages(nats_server: NatsServer) -> None:
    received: set[str] = set()

    async def handle(batch: list[Delivery[events_pb2.InferenceCompleted]]) -> None:
        received.update(d.event_id for d in batch)

    async with EventBus(nats_server.url) as bus:
        consumer = bus.consumer(events_pb2.InferenceCompleted, "restart-test", handle, fetch_timeout=0.3)
        consumer.start()
        for i in range(20):
            await bus.publish(completed(i))
        await wait_until(lambda: len(received) == 20)

        await asyncio.to_thread(nats_server.stop)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(nats_server.start)
        await wait_until(lambda: bus.nc.is_connected, timeout=30)

        for i in range(20, 40):
            await bus.publish(completed(i))
        await wait_until(lambda: len(received) == 40, timeout=30)
        await consumer.stop()
    assert received == {f"evt-{i:05d}" for i in range(40)}


@pytest.mark.parametrize("bad", ["", "llmo", "other.cost.v1.x"])
def test_bad_subjects_are_rejected(bad: str) -> None:
    from llmo.core.events import domain_of

    with pytest.raises(ValueError):
        domain_of(bad)


async def test_connect_fails_fast_when_no_server_answers() -> None:
    from llmo.core.natsd import free_port

    with pytest.raises(ConnectionError, match="no NATS server"):
        await EventBus(f"nats://127.0.0.1:{free_port()}").connect(timeout=1.0)


async def test_message_never_acked_is_parked_after_max_deliver(nats_server: NatsServer) -> None:
    """A message whose handler never returns (a consumer that hangs or dies on it)
    is redelivered after ack_wait and parked once it passes max_deliver, instead of
    JetStream silently dropping it."""
    async def hang(batch: list[Delivery[events_pb2.InferenceCompleted]]) -> None:
        if any(d.event.model == "hangs" for d in batch):
            await asyncio.sleep(3600)

    async with EventBus(nats_server.url) as bus:
        await bus.ensure_dlq()
        dead = await bus.js.pull_subscribe("llmo.dlq.inference", durable="dlq-reader2", stream="LLMO_DLQ")
        await bus.publish(events_pb2.InferenceCompleted(event_id="hang-1", model="hangs"))
        for _attempt in range(3):
            consumer = bus.consumer(events_pb2.InferenceCompleted, "hang-test", hang, max_deliver=2, ack_wait=0.5)
            task = consumer.start()
            await asyncio.sleep(0.8)
            task.cancel()  # the consumer "dies" mid-handler without acking
            with pytest.raises(asyncio.CancelledError):
                await task
        letters = [events_pb2.DeadLetter.FromString(m.data) for m in await dead.fetch(1, timeout=5)]
    assert [(d.event_id, d.reason) for d in letters] == [("hang-1", "max_deliveries_exceeded")]
    assert letters[0].deliveries == 3


async def test_connecting_in_the_background_starts_consumers_once_nats_comes_up(nats_server: NatsServer) -> None:
    """The one connection policy: a service starts with NATS down, and its start-ups
    (consumers) run once the server appears; a start-up that fails is retried."""
    received: list[str] = []
    starts: list[bool] = []

    async def handle(batch: list[Delivery[events_pb2.InferenceCompleted]]) -> None:
        received.extend(d.event_id for d in batch)

    nats_server.stop()
    bus = EventBus(nats_server.url)
    consumer = bus.consumer(events_pb2.InferenceCompleted, "late-start", handle, fetch_timeout=0.3)

    async def start_consumer() -> None:
        starts.append(True)
        if len(starts) == 1:
            raise RuntimeError("first start-up fails")
        await bus.ensure_stream("inference")
        consumer.start()

    bus.when_connected(start_consumer)
    bus.connect_in_background(attempt_s=0.5, retry_s=0.1)
    await asyncio.sleep(0.5)
    assert not bus.connected and not starts
    try:
        await asyncio.to_thread(nats_server.start)
        await asyncio.wait_for(bus.wait_connected(), 30)
        await wait_until(lambda: len(starts) == 2)
        await bus.publish(completed(1))
        await wait_until(lambda: received == ["evt-00001"])
    finally:
        await consumer.stop()
        await bus.close()


async def test_reconnect_errors_are_logged_once_per_run_not_per_attempt() -> None:
    """While NATS is down nats-py reports every reconnect attempt; the log must not flood."""
    from structlog.testing import capture_logs

    from llmo.core.events import ERROR_LOG_EVERY

    bus = EventBus("nats://127.0.0.1:1", name="flood-test")
    with capture_logs() as logs:
        for _ in range(2 * ERROR_LOG_EVERY + 5):
            await bus._on_error(ConnectionRefusedError("refused"))
        await bus._on_reconnect()
        await bus._on_error(ConnectionRefusedError("refused again"))
    errors = [entry for entry in logs if entry["event"] == "nats error"]
    assert [entry["errors_in_a_row"] for entry in errors] == [1, ERROR_LOG_EVERY, 2 * ERROR_LOG_EVERY, 1]


async def test_retry_in_place_holds_a_batch_through_an_outage_and_parks_only_the_poison(nats_server: NatsServer) -> None:
    """The `RetryInPlace` policy (cost's ledger): a failing batch is kept and retried, past
    max_deliver attempts while nothing at all succeeds (an outage: nothing is parked); a message
    that fails alone while others succeed is parked with the policy's reason; a `Rejected` from
    `decode` is parked with its own reason, before the handler sees it."""
    from llmo.core.events import Consumer, Rejected, RetryInPlace

    committed: list[str] = []
    calls = {"failing": 10}  # the first 10 handler calls fail: 2 batch attempts + 2 one-by-one passes of 4

    async def commit(batch: list[Delivery[events_pb2.InferenceCompleted]]) -> None:
        if calls["failing"] > 0:
            calls["failing"] -= 1
            raise ConnectionError("database unavailable")
        if any(d.event.model == "poison" for d in batch):
            raise ValueError("row refused")
        committed.extend(d.event_id for d in batch)

    def decode(payload: bytes) -> events_pb2.InferenceCompleted:
        event = events_pb2.InferenceCompleted.FromString(payload)
        if event.model == "unpriced":
            raise Rejected("unknown_model", f"no price for {event.model}")
        return event

    async with EventBus(nats_server.url) as bus:
        await bus.ensure_dlq()
        dead = await bus.js.pull_subscribe("llmo.dlq.inference", durable="dlq-hold", stream="LLMO_DLQ")
        for i in range(3):
            await bus.publish(completed(i))
        await bus.publish(events_pb2.InferenceCompleted(event_id="poison-1", model="poison"))
        await bus.publish(events_pb2.InferenceCompleted(event_id="unpriced-1", model="unpriced"))
        consumer = Consumer(bus, events_pb2.InferenceCompleted, "hold-test", commit, decode=decode,
                            on_failure=RetryInPlace(poison_reason="storage_error"), batch=10, max_deliver=2, backoff=(0.01,))
        consumer.start()
        try:
            letters: dict[str, events_pb2.DeadLetter] = {}
            while len(letters) < 2:
                try:
                    for msg in await dead.fetch(10, timeout=1.0):
                        letter = events_pb2.DeadLetter.FromString(msg.data)
                        letters[letter.event_id] = letter
                        await msg.ack()
                except nats.errors.TimeoutError:
                    pass
            await wait_until(lambda: len(committed) == 3)
        finally:
            await consumer.stop()
        info = await bus.js.consumer_info("LLMO_INFERENCE", "hold-test")

    assert sorted(committed) == ["evt-00000", "evt-00001", "evt-00002"]
    assert calls["failing"] == 0
    assert {event_id: letter.reason for event_id, letter in letters.items()} == {"poison-1": "storage_error", "unpriced-1": "unknown_model"}
    assert "row refused" in letters["poison-1"].detail and letters["unpriced-1"].detail == "no price for unpriced"
    assert letters["poison-1"].deliveries == 1  # held in place, never handed back for redelivery
    assert (info.num_pending, info.num_ack_pending) == (0, 0)


async def test_retry_in_place_stop_during_an_outage_hands_the_batch_back(nats_server: NatsServer) -> None:
    """Regression: a `RetryInPlace` consumer whose database is down used to wait for the outage to
    end when asked to stop (the cost service hung on SIGTERM). Now stop returns, nothing is acked
    or parked, and the next consumer on the durable gets every message."""
    from llmo.core.events import Consumer, RetryInPlace

    calls = 0
    committed: list[str] = []

    async def down(batch: list[Delivery[events_pb2.InferenceCompleted]]) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("database unavailable")

    async def up(batch: list[Delivery[events_pb2.InferenceCompleted]]) -> None:
        committed.extend(d.event_id for d in batch)

    async with EventBus(nats_server.url) as bus:
        for i in range(4):
            await bus.publish(completed(i))
        held = Consumer(bus, events_pb2.InferenceCompleted, "stop-outage", down,
                        on_failure=RetryInPlace(), batch=10, max_deliver=1000, backoff=(30.0,))
        held.start()
        await wait_until(lambda: calls >= 1)
        # backoff is 30 s per attempt: returning at all means the stop cut the wait short
        await asyncio.wait_for(held.stop(), timeout=20)
        again = Consumer(bus, events_pb2.InferenceCompleted, "stop-outage", up, on_failure=RetryInPlace(), batch=10)
        again.start()
        try:
            await wait_until(lambda: len(committed) == 4)
        finally:
            await again.stop()
        info = await bus.js.consumer_info("LLMO_INFERENCE", "stop-outage")
    assert sorted(committed) == [f"evt-{i:05d}" for i in range(4)]
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
