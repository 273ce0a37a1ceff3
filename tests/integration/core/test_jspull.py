"""The lean JetStream pull connection against a real nats-server: batches, acks,
naks and redelivery, early return on expiry, and reconnecting after a restart."""

from __future__ import annotations

import asyncio

import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from llmo.core.events import EventBus, stream_name
from llmo.core.jspull import PullClient, parse_headers
from llmo.core.natsd import NatsServer
from llmo.protos.common.v1 import common_pb2
from llmo.protos.events.v1 import events_pb2

SUBJECT = "llmo.inference.v1.completed"
STREAM = stream_name("inference")


async def _publish(bus: EventBus, ids: range) -> None:
    for i in ids:
        event = events_pb2.InferenceCompleted(event_id=f"e-{i}", model="m", usage=common_pb2.Usage(output_tokens=i))
        await bus.publish(event)


async def _durable(bus: EventBus, name: str, ack_wait: float = 30.0) -> None:
    await bus.ensure_stream("inference")
    config = ConsumerConfig(durable_name=name, ack_policy=AckPolicy.EXPLICIT, filter_subject=SUBJECT, ack_wait=ack_wait)
    await bus.js.add_consumer(STREAM, config)


async def _pending(bus: EventBus, name: str) -> tuple[int, int]:
    info = await bus.js.consumer_info(STREAM, name)
    return info.num_pending, info.num_ack_pending


def test_headers_are_parsed_case_insensitively_with_the_status_line() -> None:
    raw = b"NATS/1.0 408 Request Timeout\r\nNats-Msg-Id: abc\r\nLLMO-Type: x.Y\r\nNats-Msg-Id: second\r\n\r\n"
    assert parse_headers(raw) == {"status": "408 Request Timeout", "nats-msg-id": "abc", "llmo-type": "x.Y"}


async def test_pulls_batches_with_headers_and_acks_them(nats_server: NatsServer) -> None:
    async with EventBus(nats_server.url) as bus:
        await _durable(bus, "lean")
        await _publish(bus, range(25))
        client = PullClient(nats_server.url, STREAM, "lean")
        await client.connect()
        try:
            first = await client.collect(client.request(10, 1.0), 5.0)
            second = await client.collect(client.request(100, 0.5), 5.0)  # fewer left than asked: returns on expiry
            assert len(first) == 10 and len(second) == 15
            received = [events_pb2.InferenceCompleted.FromString(m.data).event_id for m in first + second]
            assert received == [f"e-{i}" for i in range(25)]
            assert first[0].header("nats-msg-id") == "e-0" and first[0].header("llmo-type") == "llmo.events.v1.InferenceCompleted"
            assert first[0].deliveries == 1 and [m.stream_sequence for m in first] == list(range(1, 11))
            client.ack(first + second)
            await client.flush()
            assert await _pending(bus, "lean") == (0, 0)
        finally:
            await client.close()


async def test_nak_redelivers_and_unacked_messages_come_back_after_ack_wait(nats_server: NatsServer) -> None:
    async with EventBus(nats_server.url) as bus:
        await _durable(bus, "redeliver", ack_wait=1.0)
        await _publish(bus, range(4))
        client = PullClient(nats_server.url, STREAM, "redeliver")
        await client.connect()
        try:
            batch = await client.collect(client.request(4, 1.0), 5.0)
            client.ack(batch[:1])
            client.nak(batch[1:2])
            naked = await client.collect(client.request(1, 0.5), 5.0)  # back at once, well before ack_wait
            assert [(m.stream_sequence, m.deliveries) for m in naked] == [(2, 2)]
            prefix = f"$JS.ACK.{STREAM}.redeliver."
            assert naked[0].redelivered(prefix) and not batch[0].redelivered(prefix)
            assert naked[0].redelivered("$JS.ACK.other.prefix.")  # falls back to parsing the subject
            client.ack(naked)
            # batch[2:] was neither acked nor nak'ed: redelivered once ack_wait passes
            again = await client.collect(client.request(2, 3.0), 6.0)
            assert [(m.stream_sequence, m.deliveries) for m in again] == [(3, 2), (4, 2)]
            client.ack(again)
            await client.flush()
            assert await _pending(bus, "redeliver") == (0, 0)
        finally:
            await client.close()


async def test_a_lost_server_fails_the_pull_and_reconnecting_resumes(nats_server: NatsServer) -> None:
    async with EventBus(nats_server.url) as bus:
        await _durable(bus, "restart", ack_wait=2.0)
        await _publish(bus, range(3))
    client = PullClient(nats_server.url, STREAM, "restart")
    await client.connect()
    try:
        batch = await client.collect(client.request(3, 1.0), 5.0)
        assert len(batch) == 3  # not acked: must come back after the restart
        token = client.request(10, 30.0)
        nats_server.stop()
        with pytest.raises(ConnectionError):
            await client.collect(token, 10.0)
        assert not client.connected
        with pytest.raises(ConnectionError):
            client.ack(batch)
        nats_server.start()
        for _ in range(50):
            try:
                await client.connect()
                break
            except OSError:
                await asyncio.sleep(0.1)
        again = await client.collect(client.request(3, 5.0), 10.0)
        assert sorted(m.stream_sequence for m in again) == [1, 2, 3]
        client.ack(again)
        await client.flush()
    finally:
        await client.close()


async def test_connecting_to_a_closed_port_raises(nats_server: NatsServer) -> None:
    url = nats_server.url
    nats_server.stop()
    with pytest.raises(OSError):
        await PullClient(url, STREAM, "nobody").connect(timeout=2.0)


async def test_a_nak_with_a_delay_is_redelivered_only_after_it(nats_server: NatsServer) -> None:
    async with EventBus(nats_server.url) as bus:
        await _durable(bus, "delayed")
        await _publish(bus, range(1))
        client = PullClient(nats_server.url, STREAM, "delayed")
        await client.connect()
        try:
            [first] = await client.collect(client.request(1, 1.0), 5.0)
            client.nak([first], delay=30.0)
            await client.flush()
            # a plain nak comes back at once (see above); this one is still waiting out its delay
            assert await client.collect(client.request(1, 0.5), 5.0) == []
            assert await _pending(bus, "delayed") == (0, 1)
            client.nak([first])  # a nak without delay replaces it: back at once
            [again] = await client.collect(client.request(1, 5.0), 10.0)
            assert (again.stream_sequence, again.deliveries) == (1, 2)
            client.ack([again])
            await client.flush()
        finally:
            await client.close()
