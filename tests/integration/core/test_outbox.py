"""The outbox publish policy against a real nats-server that is down, comes up late,
goes away mid-flow, and a publisher process killed with events still on disk."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client import REGISTRY

from llmo.core.events import EventBus, stream_name
from llmo.core.natsd import NatsServer
from llmo.core.outbox import Publisher, outbox_path
from llmo.protos.events.v1 import events_pb2

from .test_events import completed, wait_until

ROOT = Path(__file__).resolve().parents[3]
STREAM = stream_name("inference")
HANG_GUARD_S = 30.0  # only against a hang; publish() must not wait on NATS at all


async def stored_ids(url: str) -> list[str]:
    """The `Nats-Msg-Id` of every message in the inference stream, in stream order."""
    async with EventBus(url) as bus:
        await bus.ensure_stream("inference")
        count = (await bus.js.stream_info(STREAM)).state.messages
        ids = []
        for seq in range(1, count + 1):
            msg = await bus.js.get_msg(STREAM, seq)
            ids.append((msg.headers or {})["Nats-Msg-Id"])
        return ids


def depth_metric(service: str) -> float | None:
    return REGISTRY.get_sample_value("llmo_outbox_depth", {"service": service})


async def test_publish_while_nats_is_down_then_delivered_in_order_exactly_once(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    nats_server.stop()
    bus = EventBus(nats_server.url)
    bus.connect_in_background()
    publisher = await Publisher(bus, tmp_path / "outbox.db", service="t-down").start()
    try:
        events = [completed(i) for i in range(60)]
        # Returns while the server is down: the events are on disk, not on the wire.
        ids = await asyncio.wait_for(asyncio.gather(*(publisher.publish(e) for e in events)), HANG_GUARD_S)
        assert ids == [e.event_id for e in events]
        assert not bus.connected
        assert publisher.depth == 60 and depth_metric("t-down") == 60
        assert REGISTRY.get_sample_value("llmo_outbox_oldest_age_seconds", {"service": "t-down"}) >= 0  # type: ignore[operator]

        nats_server.start()
        await wait_until(lambda: publisher.depth == 0, timeout=30)
        assert depth_metric("t-down") == 0
    finally:
        await publisher.stop()
        await bus.close()
    assert await stored_ids(nats_server.url) == ids


async def test_outage_mid_flow_keeps_order_and_never_duplicates(nats_server: NatsServer, tmp_path: Path) -> None:
    bus = EventBus(nats_server.url)
    bus.connect_in_background()
    await asyncio.wait_for(bus.wait_connected(), HANG_GUARD_S)
    publisher = await Publisher(bus, tmp_path / "outbox.db", service="t-outage").start()
    try:
        before = [await publisher.publish(completed(i)) for i in range(20)]
        await wait_until(lambda: publisher.depth == 0)
        nats_server.stop()
        await wait_until(lambda: not bus.connected)
        during = await asyncio.wait_for(
            asyncio.gather(*(publisher.publish(completed(i)) for i in range(20, 70))), HANG_GUARD_S
        )
        assert publisher.depth == 50 and depth_metric("t-outage") == 50
        nats_server.start()
        await wait_until(lambda: publisher.depth == 0, timeout=30)
        after = [await publisher.publish(completed(i)) for i in range(70, 80)]
        assert await publisher.flush(HANG_GUARD_S)
    finally:
        await publisher.stop()
        await bus.close()
    assert await stored_ids(nats_server.url) == before + during + after


CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    from llmo.core.events import EventBus
    from llmo.core.outbox import Publisher
    from tests.integration.core.test_events import completed

    async def main() -> None:
        bus = EventBus(sys.argv[1])
        bus.connect_in_background()
        publisher = await Publisher(bus, Path(sys.argv[2]), service="t-child").start()
        for i in range(40):
            await publisher.publish(completed(i))
        print("written", flush=True)
        os._exit(9)  # as if killed: no stop, no flush

    asyncio.run(main())
    """
)


async def test_events_left_by_a_killed_process_are_sent_after_restart(nats_server: NatsServer, tmp_path: Path) -> None:
    path = outbox_path(tmp_path, "child")
    nats_server.stop()
    child = subprocess.run(
        [sys.executable, "-c", CHILD, nats_server.url, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 9 and "written" in child.stdout, child.stderr

    nats_server.start()
    bus = EventBus(nats_server.url)
    bus.connect_in_background()
    publisher = await Publisher(bus, path, service="t-restart").start()
    try:
        assert publisher.depth == 40
        await wait_until(lambda: publisher.depth == 0, timeout=30)
    finally:
        await publisher.stop()
        await bus.close()
    assert await stored_ids(nats_server.url) == [completed(i).event_id for i in range(40)]


async def test_stop_flushes_then_keeps_the_rest_for_the_next_start(nats_server: NatsServer, tmp_path: Path) -> None:
    nats_server.stop()
    bus = EventBus(nats_server.url)
    bus.connect_in_background()
    publisher = await Publisher(bus, tmp_path / "outbox.db", service="t-stop").start()
    event = events_pb2.InferenceCompleted(model="llmo-demo")
    event_id = await publisher.publish(event)
    assert event.event_id == event_id  # the id it is published under is written into the event
    await asyncio.wait_for(publisher.stop(timeout=0.2), HANG_GUARD_S)  # bounded while NATS is down
    await bus.close()

    nats_server.start()
    async with EventBus(nats_server.url) as bus:
        again = await Publisher(bus, tmp_path / "outbox.db", service="t-stop").start()
        assert again.depth == 1
        assert await again.flush(HANG_GUARD_S)
        await again.stop()
    assert await stored_ids(nats_server.url) == [event_id]
