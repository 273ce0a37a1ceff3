"""High-throughput JetStream consumer of usage events.

It uses the core event bus (connection, streams, dead-letter subject and its
``DeadLetter`` format and metrics) but pulls with its own request loop: one
``$JS.API.CONSUMER.MSG.NEXT`` request per batch, messages collected by a
subscription callback, the next batch requested before the current one is
processed. nats-py's ``fetch()`` awaits every message separately, which caps a
consumer at a few thousand messages per second on a small machine; the ledger
needs more.

Guarantees are the bus's: a durable consumer with explicit acks, each message
acked only after its batch committed (or after it was parked on
``llmo.dlq.<domain>``), bounded redelivery, idempotent writes keyed by event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError, Message
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from llmo.core.events import EventBus, dlq_subject, domain_of, stream_name, subject_of
from llmo.core.logging import get_logger
from llmo.core.metrics import EVENTS_DEAD_LETTERED, EVENTS_HANDLED
from llmo.cost.engine import USAGE_REJECTED, CostEngine
from llmo.cost.records import (
    LedgerRecord,
    RecordRejected,
    UsageInput,
    usage_from_inference,
    usage_from_router,
)
from llmo.protos.events.v1 import events_pb2

log = get_logger(__name__)

Decoder = Callable[[bytes], UsageInput]


def _decoder(message_type: type[Message], convert: Callable[[Message], UsageInput]) -> tuple[str, str, Decoder]:
    def decode(payload: bytes) -> UsageInput:
        return convert(message_type.FromString(payload))

    return subject_of(message_type), message_type.DESCRIPTOR.full_name, decode


INFERENCE = _decoder(events_pb2.InferenceCompleted, usage_from_inference)  # type: ignore[arg-type]
ROUTER = _decoder(events_pb2.RouterCompleted, usage_from_router)  # type: ignore[arg-type]


@dataclass
class _Pull:
    size: int
    messages: list[Msg] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _deliveries(msg: Msg) -> int:
    """Delivery count from the ack subject, without nats-py's slower full metadata parse."""
    tokens = msg.reply.split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(tokens[4])
    return int(msg.metadata.num_delivered)


@dataclass
class _Prepared:
    records: list[LedgerRecord] = field(default_factory=list)
    owners: list[Msg] = field(default_factory=list)
    rejected: list[tuple[Msg, str, str, str]] = field(default_factory=list)


class UsageConsumer:
    """Durable pull consumer of one usage subject, writing batches to the ledger."""

    def __init__(
        self,
        bus: EventBus,
        engine: CostEngine,
        source: tuple[str, str, Decoder],
        durable: str,
        *,
        batch: int = 1000,
        ack_wait: float = 30.0,
        max_deliver: int = 5,
        expires: float = 0.25,
        backoff: tuple[float, ...] = (0.2, 1.0, 5.0),
    ) -> None:
        self.bus = bus
        self.engine = engine
        self.subject, self.message_type, self.decode = source
        self.domain = domain_of(self.subject)
        self.stream = stream_name(self.domain)
        self.durable = durable
        self.batch = batch
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.expires = expires
        self.backoff = backoff
        self._pulls: dict[str, _Pull] = {}
        self._ids = itertools.count()
        self._inbox = ""
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        await self.bus.ensure_stream(self.domain)
        await self.bus.ensure_dlq()
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=self.subject,
            # never drop a message silently: past max_deliver it is parked on the DLQ instead
            max_deliver=-1,
            ack_wait=self.ack_wait,
            max_ack_pending=max(4 * self.batch, 1000),
        )
        # creates the durable, or updates the editable settings of an existing one
        await self.bus.js.add_consumer(self.stream, config)
        self._inbox = self.bus.nc.new_inbox()
        self._sub = await self.bus.nc.subscribe(f"{self._inbox}.*", cb=self._on_message, pending_msgs_limit=8 * self.batch + 1000)
        self._task = asyncio.create_task(self._run(), name=f"cost-ingest:{self.durable}")

    async def stop(self) -> None:
        """Finish the batch in hand, give back what was prefetched, stop."""
        self._stopping = True
        if self._task:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        for pull in self._pulls.values():
            for msg in pull.messages:
                with contextlib.suppress(Exception):
                    await msg.nak()
        self._pulls.clear()

    async def _on_message(self, msg: Msg) -> None:
        # Only one request collects at a time. Delivered messages carry their
        # original subject; statuses (request expired, ...) come on the request's inbox.
        if not msg.reply:
            pull = self._pulls.get(msg.subject.rsplit(".", 1)[-1])
            if pull is not None:
                pull.done.set()
            return
        if not self._pulls:
            await msg.nak()  # delivered after we stopped collecting: hand it back now
            return
        pull = next(iter(self._pulls.values()))
        pull.messages.append(msg)
        if len(pull.messages) >= pull.size:
            pull.done.set()

    async def _request(self) -> tuple[str, _Pull]:
        token = str(next(self._ids))
        pull = _Pull(self.batch)
        self._pulls[token] = pull
        body = json.dumps({"batch": self.batch, "expires": int(self.expires * 1e9)}).encode()
        await self.bus.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}", body, reply=f"{self._inbox}.{token}")
        return token, pull

    async def _collect(self, token: str, pull: _Pull) -> list[Msg]:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pull.done.wait(), self.expires + 2.0)
        self._pulls.pop(token, None)
        return pull.messages

    async def _run(self) -> None:
        # Two batches overlap: while one commits (SQL in a thread), the next is
        # collected, decoded and priced on the event loop. Acks are explicit per
        # message, so batches may finish in any order.
        current: tuple[str, _Pull] | None = None
        committing: asyncio.Task[None] | None = None
        while not self._stopping:
            try:
                if current is None:
                    current = await self._request()
                messages = await self._collect(*current)
                current = None if self._stopping else await self._request()
                if not messages:
                    continue
                prepared = self._prepare(messages)
                if committing is not None:
                    task, committing = committing, None
                    await task
                committing = asyncio.create_task(self._finish(prepared))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # connection lost, server restarting: requests are simply re-sent
                log.warning("usage consumer loop failed; retrying", consumer=self.durable, error=repr(error))
                current = None
                await asyncio.sleep(0.5)
        if committing is not None:
            with contextlib.suppress(Exception):
                await committing

    def _prepare(self, messages: list[Msg]) -> _Prepared:
        prepared = _Prepared()
        price = self.engine.price
        for msg in messages:
            headers = msg.headers or {}
            declared = headers.get("llmo-type", self.message_type)
            if _deliveries(msg) > self.max_deliver:
                detail = f"delivered {_deliveries(msg)} times without being committed (consumer crashes?)"
                prepared.rejected.append((msg, headers.get("Nats-Msg-Id", ""), "max_deliveries_exceeded", detail))
                continue
            try:
                if declared != self.message_type:
                    raise DecodeError(f"llmo-type is {declared!r}, expected {self.message_type!r}")
                prepared.records.append(price(self.decode(msg.data)))
                prepared.owners.append(msg)
            except DecodeError as error:
                prepared.rejected.append((msg, headers.get("Nats-Msg-Id", ""), "malformed_payload", str(error)))
            except RecordRejected as error:
                USAGE_REJECTED.labels(error.reason.value).inc()
                prepared.rejected.append((msg, headers.get("Nats-Msg-Id", ""), error.reason.value, error.detail))
        return prepared

    async def _finish(self, prepared: _Prepared) -> None:
        records, owners = prepared.records, prepared.owners
        failed = await self._commit(records, owners) if records else set()
        for msg, event_id, reason, detail in prepared.rejected:
            await self._dead_letter(msg, event_id, reason, detail)
        for msg, record in zip(owners, records, strict=True):
            if record.event_id not in failed:
                await msg.ack()
        ok = len(records) - len(failed)
        if ok:
            EVENTS_HANDLED.labels(self.durable, "ok").inc(ok)

    async def _commit(self, records: list[LedgerRecord], owners: list[Msg]) -> set[str]:
        """Commit the batch; returns the event ids that were dead-lettered instead.

        A failing batch is retried with backoff (an outage just waits); after
        ``max_deliver`` failures each record is tried alone, and records that
        fail while others succeed are parked as ``storage_error``.
        """
        attempt = 0
        while True:
            try:
                await self.engine.ingest(records)
                return set()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                attempt += 1
                log.warning("ledger batch failed", consumer=self.durable, size=len(records), attempt=attempt, error=repr(error))
                for msg in owners:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                if attempt >= self.max_deliver:
                    parked = await self._isolate(records, owners)
                    if parked is not None:
                        return parked
                await asyncio.sleep(self.backoff[min(attempt - 1, len(self.backoff) - 1)])

    async def _isolate(self, records: list[LedgerRecord], owners: list[Msg]) -> set[str] | None:
        """Write records one by one; a record is poison only if it fails twice while others commit."""
        pending = list(records)
        errors: dict[str, str] = {}
        committed = 0
        for _ in range(2):
            errors = {}
            for record in pending:
                try:
                    await self.engine.ingest([record])
                    committed += 1
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    errors[record.event_id] = repr(error)
            pending = [r for r in pending if r.event_id in errors]
            if not pending:
                return set()
        if committed == 0:
            return None  # nothing at all can be written: an outage, not a poison record
        for msg, record in zip(owners, records, strict=True):
            if record.event_id in errors:
                await self._dead_letter(msg, record.event_id, "storage_error", errors[record.event_id])
        return set(errors)

    async def _dead_letter(self, msg: Msg, event_id: str, reason: str, detail: str) -> None:
        """Park a message on ``llmo.dlq.<domain>`` (published before the original is acked)."""
        headers = msg.headers or {}
        occurred = timestamp_pb2.Timestamp()
        occurred.GetCurrentTime()
        letter = events_pb2.DeadLetter(
            event_id=event_id,
            occurred_at=occurred,
            original_subject=self.subject,
            consumer=self.durable,
            reason=reason,
            detail=detail[:2000],
            deliveries=msg.metadata.num_delivered,
            message_type=headers.get("llmo-type", ""),
            payload=msg.data,
        )
        dlq_id = f"dlq:{self.durable}:{event_id or msg.metadata.sequence.stream}"
        await self.bus.js.publish(
            dlq_subject(self.domain),
            letter.SerializeToString(),
            headers={"Nats-Msg-Id": dlq_id, "llmo-type": letter.DESCRIPTOR.full_name, "llmo-reason": reason},
        )
        await msg.term()
        EVENTS_DEAD_LETTERED.labels(self.durable, reason).inc()
        log.warning("usage event dead-lettered", consumer=self.durable, event_id=event_id, reason=reason, detail=detail)
