"""High-throughput JetStream consumer of usage events.

It uses the core event bus for the stream, the durable consumer, the
dead-letter subject and its ``DeadLetter`` format and metrics, but pulls over
its own lean connection (:class:`llmo.core.jspull.PullClient`): one
``$JS.API.CONSUMER.MSG.NEXT`` request per batch, the next batch requested
before the current one is processed, and the acks of a batch written at once.
nats-py's per-message objects and acks cap a consumer at a few thousand
messages per second on a small machine; the ledger needs more.

Guarantees are the bus's: a durable consumer with explicit acks, each message
acked only after its batch committed (or after it was parked on
``llmo.dlq.<domain>``), bounded redelivery, idempotent writes keyed by event id.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError, Message
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from llmo.core import tracing
from llmo.core.events import EventBus, dlq_subject, domain_of, stream_name, subject_of
from llmo.core.jspull import PullClient, PulledMessage
from llmo.core.logging import get_logger
from llmo.core.metrics import EVENTS_DEAD_LETTERED, EVENTS_HANDLED
from llmo.cost.engine import USAGE_REJECTED, CostEngine
from llmo.cost.prices import PriceCatalog
from llmo.cost.records import LedgerRecord, RecordRejected, price_inference_event, price_router_event
from llmo.protos.events.v1 import events_pb2

log = get_logger(__name__)

# payload -> priced ledger record (raises DecodeError or RecordRejected)
Decoder = Callable[[bytes, PriceCatalog], LedgerRecord]


def _decoder(message_type: type[Message], price: Callable[[Any, PriceCatalog], LedgerRecord]) -> tuple[str, str, Decoder]:
    parse = message_type.FromString

    def decode(payload: bytes, catalog: PriceCatalog) -> LedgerRecord:
        return price(parse(payload), catalog)

    return subject_of(message_type), message_type.DESCRIPTOR.full_name, decode


INFERENCE = _decoder(events_pb2.InferenceCompleted, price_inference_event)
ROUTER = _decoder(events_pb2.RouterCompleted, price_router_event)


@dataclass
class _Prepared:
    records: list[LedgerRecord] = field(default_factory=list)
    owners: list[PulledMessage] = field(default_factory=list)
    rejected: list[tuple[PulledMessage, str, str, str]] = field(default_factory=list)
    # one consumer span per message (owners first, then rejected), only with tracing on
    spans: tracing.MessageSpans | None = None


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
        self._client: PullClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # the llmo-type header as our own publishers write it; anything else is parsed properly
        self._type_line = f"\r\nllmo-type: {self.message_type}\r\n".encode()

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
        self._client = PullClient(self.bus.url, self.stream, self.durable, name=f"llmo-cost-{self.durable}")
        await self._client.connect()
        self._task = asyncio.create_task(self._run(), name=f"cost-ingest:{self.durable}")

    async def stop(self) -> None:
        """Finish the batch in hand, give back what was prefetched, stop."""
        self._stopping = True
        if self._task:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.nak(self._client.abandon())
                await self._client.flush(timeout=2.0)
            await self._client.close()

    async def _run(self) -> None:
        # Two batches overlap: while one commits (SQL in a thread), the next is
        # collected, decoded and priced on the event loop. Acks are explicit per
        # message, so batches may finish in any order.
        client = self._client
        assert client is not None
        current: str | None = None
        committing: asyncio.Task[None] | None = None
        while not self._stopping:
            try:
                if not client.connected:
                    await client.connect()
                    current = None
                if current is None:
                    current = client.request(self.batch, self.expires)
                messages = await client.collect(current, self.expires + 2.0)
                current = None if self._stopping else client.request(self.batch, self.expires)
                if not messages:
                    continue
                prepared = self._prepare(messages)
                if committing is not None:
                    task, committing = committing, None
                    await task
                committing = asyncio.create_task(self._finish(prepared))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # connection lost, server restarting: reconnect, unacked messages come back
                log.warning("usage consumer loop failed; retrying", consumer=self.durable, error=repr(error))
                current = None
                await asyncio.sleep(0.5)
        if committing is not None:
            with contextlib.suppress(Exception):
                await committing

    def _prepare(self, messages: list[PulledMessage]) -> _Prepared:
        prepared = _Prepared()
        catalog, decode, type_line = self.engine.catalog, self.decode, self._type_line
        ack_prefix = f"$JS.ACK.{self.stream}.{self.durable}."
        for msg in messages:
            if msg.redelivered(ack_prefix) and msg.deliveries > self.max_deliver:
                detail = f"delivered {msg.deliveries} times without being committed (consumer crashes?)"
                prepared.rejected.append((msg, msg.header("Nats-Msg-Id"), "max_deliveries_exceeded", detail))
                continue
            try:
                if type_line not in msg.raw_headers:
                    declared = msg.header("llmo-type", self.message_type)
                    if declared != self.message_type:
                        raise DecodeError(f"llmo-type is {declared!r}, expected {self.message_type!r}")
                prepared.records.append(decode(msg.data, catalog))
                prepared.owners.append(msg)
            except DecodeError as error:
                prepared.rejected.append((msg, msg.header("Nats-Msg-Id"), "malformed_payload", str(error)))
            except RecordRejected as error:
                USAGE_REJECTED.labels(error.reason.value).inc()
                prepared.rejected.append((msg, msg.header("Nats-Msg-Id"), error.reason.value, error.detail))
        if tracing.enabled():
            consumed = [*prepared.owners, *(rejected[0] for rejected in prepared.rejected)]
            prepared.spans = tracing.message_spans(self.subject, self.durable, (m.header("traceparent") for m in consumed))
        return prepared

    async def _finish(self, prepared: _Prepared) -> None:
        assert self._client is not None
        records, owners = prepared.records, prepared.owners
        failed = await self._commit(records, owners) if records else set()
        for msg, event_id, reason, detail in prepared.rejected:
            await self._dead_letter(msg, event_id, reason, detail)
        self._client.ack([msg for msg, record in zip(owners, records, strict=True) if record.event_id not in failed])
        ok = len(records) - len(failed)
        if ok:
            EVENTS_HANDLED.labels(self.durable, "ok").inc(ok)
        if prepared.spans is not None:
            for index, record in enumerate(records):
                if record.event_id in failed:
                    prepared.spans.fail(index, "storage_error")
            for index, (_, _, reason, _) in enumerate(prepared.rejected, start=len(records)):
                prepared.spans.fail(index, reason)
            prepared.spans.end()

    async def _commit(self, records: list[LedgerRecord], owners: list[PulledMessage]) -> set[str]:
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
                if self._client is not None:
                    with contextlib.suppress(Exception):
                        self._client.in_progress(owners)
                if attempt >= self.max_deliver:
                    parked = await self._isolate(records, owners)
                    if parked is not None:
                        return parked
                await asyncio.sleep(self.backoff[min(attempt - 1, len(self.backoff) - 1)])

    async def _isolate(self, records: list[LedgerRecord], owners: list[PulledMessage]) -> set[str] | None:
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

    async def _dead_letter(self, msg: PulledMessage, event_id: str, reason: str, detail: str) -> None:
        """Park a message on ``llmo.dlq.<domain>`` (published before the original is terminated)."""
        headers = msg.headers
        occurred = timestamp_pb2.Timestamp()
        occurred.GetCurrentTime()
        letter = events_pb2.DeadLetter(
            event_id=event_id,
            occurred_at=occurred,
            original_subject=self.subject,
            consumer=self.durable,
            reason=reason,
            detail=detail[:2000],
            deliveries=msg.deliveries,
            message_type=headers.get("llmo-type", ""),
            payload=msg.data,
        )
        dlq_id = f"dlq:{self.durable}:{event_id or msg.stream_sequence}"
        await self.bus.js.publish(
            dlq_subject(self.domain),
            letter.SerializeToString(),
            headers={"Nats-Msg-Id": dlq_id, "llmo-type": letter.DESCRIPTOR.full_name, "llmo-reason": reason},
        )
        if self._client is not None:
            self._client.term([msg])
        EVENTS_DEAD_LETTERED.labels(self.durable, reason).inc()
        log.warning("usage event dead-lettered", consumer=self.durable, event_id=event_id, reason=reason, detail=detail)
