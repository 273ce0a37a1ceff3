"""NATS JetStream event bus.

- One stream per domain: `LLMO_COST` holds `llmo.cost.>`; dead letters live in
  `LLMO_DLQ` (`llmo.dlq.>`).
- `envelope()` turns a protobuf message into what goes on the wire: the subject
  named by its `subject` option and headers `Nats-Msg-Id` (the event id: JetStream
  drops a re-publish inside the duplicate window), `llmo-type` and `traceparent`.
  Services publish through `llmo.core.outbox.Publisher` (durable, never blocks on
  NATS); `EventBus.publish()` is the direct, blocking path beneath it.
- `EventBus.connect_in_background()` is the one connection policy of every
  service: start without NATS, connect whenever it comes up, then run the
  `when_connected` start-ups (consumers) once.
- `Consumer` is the one durable pull consumer of every service, over the lean
  pull connection of `llmo.core.jspull`: it hands batches to an async handler and
  acks only after the handler returns (the handler commits its side effect
  first). An unreadable message, or one delivered more than `max_deliver` times
  without an ack, is parked on `llmo.dlq.<domain>` as a `DeadLetter` with the
  reason, as is one the handler `reject()`s. A failing batch follows the
  consumer's failure policy: `Redeliver` (default: message by message, then
  redelivery with backoff up to `max_deliver`) or `RetryInPlace` (hold and retry
  the batch through an outage; isolate a poison message). Handlers must be
  idempotent on `event_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

import nats
import nats.errors
import nats.js.errors
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from llmo.core import context as ctx
from llmo.core import tracing
from llmo.core.jspull import PullClient, PulledMessage
from llmo.core.logging import get_logger
from llmo.core.metrics import EVENTS_DEAD_LETTERED, EVENTS_HANDLED, EVENTS_PUBLISHED
from llmo.protos.events.v1 import events_pb2

log = get_logger(__name__)

T = TypeVar("T", bound=Message)
E = TypeVar("E")  # what a consumer hands its handler: the decoded event

DLQ_STREAM = "LLMO_DLQ"
DUPLICATE_WINDOW_SECONDS = 120.0
ERROR_LOG_EVERY = 100


def subject_of(message_type: type[Message] | Message) -> str:
    """The subject a message type is published on (its `llmo.events.v1.subject` option)."""
    options = message_type.DESCRIPTOR.GetOptions()
    subject = options.Extensions[events_pb2.subject]
    if not subject:
        raise ValueError(f"{message_type.DESCRIPTOR.full_name} has no `subject` option")
    return str(subject)


def domain_of(subject: str) -> str:
    parts = subject.split(".")
    if len(parts) < 3 or parts[0] != "llmo":
        raise ValueError(f"subject {subject!r} is not llmo.<domain>.v1.<event>")
    return parts[1]


@dataclass(frozen=True, slots=True)
class Envelope:
    """An event as it goes on the wire (and into the outbox)."""

    subject: str
    event_id: str
    headers: dict[str, str]
    payload: bytes


def envelope(message: Message, *, event_id: str | None = None, subject: str | None = None) -> Envelope:
    """Subject, headers and payload of an event; the trace is the caller's, captured now.

    A message with an empty `event_id` field gets the id it is published under.
    """
    subject = subject or subject_of(message)
    event_id = event_id or getattr(message, "event_id", "") or str(uuid.uuid4())
    if hasattr(message, "event_id") and not message.event_id:  # type: ignore[attr-defined]
        message.event_id = event_id  # type: ignore[attr-defined]
    trace = ctx.current_trace()
    headers = {
        "Nats-Msg-Id": event_id,
        "llmo-type": message.DESCRIPTOR.full_name,
        "traceparent": (trace or ctx.TraceContext.new()).header(),
    }
    return Envelope(subject, event_id, headers, message.SerializeToString())


class EventPublisher(Protocol):
    """What a publishing component needs: `llmo.core.outbox.Publisher` in services."""

    async def publish(self, message: Message, *, event_id: str | None = None, subject: str | None = None) -> object: ...


def stream_name(domain: str) -> str:
    return f"LLMO_{domain.upper()}"


def dlq_subject(domain: str) -> str:
    return f"llmo.dlq.{domain}"


class EventBus:
    """A NATS connection with JetStream, reconnecting forever."""

    def __init__(self, url: str, *, name: str = "llmo") -> None:
        self.url = url
        self.name = name
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._streams: set[str] = set()
        self._up = asyncio.Event()
        self._errors_since_connect = 0
        self._connecting: asyncio.Task[None] | None = None
        self._on_connected: list[Callable[[], Awaitable[None]]] = []

    async def connect(self, *, timeout: float = 5.0) -> EventBus:
        """Connect, failing after `timeout` seconds if no server answers.

        Once connected, the client reconnects forever; but nats-py applies the
        unlimited reconnect setting to the first connection too, so the first
        connection is bounded here or a service would hang at start-up.
        """
        try:
            self._nc = await asyncio.wait_for(
                nats.connect(
                    servers=[self.url],
                    name=self.name,
                    connect_timeout=min(timeout, 2.0),
                    reconnect_time_wait=0.25,
                    max_reconnect_attempts=-1,
                    allow_reconnect=True,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnect,
                    reconnected_cb=self._on_reconnect,
                ),
                timeout,
            )
        except TimeoutError as error:
            raise ConnectionError(f"no NATS server answered at {self.url} within {timeout}s") from error
        self._js = self._nc.jetstream()
        self._up.set()
        return self

    def connect_in_background(self, *, attempt_s: float = 2.0, retry_s: float = 0.5) -> asyncio.Task[None]:
        """Connect without blocking start-up, retrying forever; then run the `when_connected` start-ups.

        A service starts whether or not NATS is up: its publisher keeps events
        in the outbox and its consumers start once the first connection is made
        (after that, nats-py reconnects on its own).
        """
        if self._connecting is None:
            self._connecting = asyncio.create_task(self._connect_forever(attempt_s, retry_s), name=f"nats-connect:{self.name}")
        return self._connecting

    def when_connected(self, start: Callable[[], Awaitable[None]]) -> None:
        """Run `start` once connected (by `connect_in_background`), retried until it succeeds."""
        self._on_connected.append(start)

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def wait_connected(self) -> None:
        await self._up.wait()

    async def _connect_forever(self, attempt_s: float, retry_s: float) -> None:
        attempts = 0
        while self._nc is None:
            try:
                await self.connect(timeout=attempt_s)
            except Exception as error:
                attempts += 1
                if attempts == 1 or attempts % 60 == 0:
                    log.warning("NATS unreachable; still connecting in the background", url=self.url, attempts=attempts, error=repr(error))
                await asyncio.sleep(retry_s)
        if attempts:
            log.info("connected to NATS", url=self.url, attempts=attempts + 1)
        for start in self._on_connected:
            delay = retry_s
            while True:
                try:
                    await start()
                    break
                except Exception as error:  # JetStream not ready yet, connection lost again
                    log.warning("start-up after NATS connect failed; retrying", step=getattr(start, "__qualname__", "?"), error=repr(error))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
            self._connecting = None
        self._up.clear()
        if self._nc and not self._nc.is_closed:
            # Consumers ack before they stop, so flushing pending publishes is all
            # that is left; drain() would wait out its timeout on pull subscriptions.
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            await self._nc.close()
        self._nc = None
        self._js = None

    async def __aenter__(self) -> EventBus:
        return await self.connect()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("EventBus is not connected")
        return self._js

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise RuntimeError("EventBus is not connected")
        return self._nc

    async def ensure_stream(self, domain: str) -> str:
        """Create (or keep) the stream of a domain; returns its name."""
        name = stream_name(domain)
        subjects = [f"llmo.{domain}.>"]
        await self._ensure(name, subjects)
        return name

    async def ensure_dlq(self) -> str:
        await self._ensure(DLQ_STREAM, ["llmo.dlq.>"])
        return DLQ_STREAM

    async def _ensure(self, name: str, subjects: list[str]) -> None:
        if name in self._streams:
            return
        config = StreamConfig(
            name=name,
            subjects=subjects,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        )
        try:
            await self.js.stream_info(name)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError:
                # Another process created it between our look-up and add.
                await self.js.stream_info(name)
        self._streams.add(name)

    async def publish(
        self,
        message: Message,
        *,
        event_id: str | None = None,
        subject: str | None = None,
        timeout: float = 5.0,
        retries: int = 3,
    ) -> bool:
        """Publish an event now, waiting for JetStream; returns False when it saw the event id already.

        Retries with the same `Nats-Msg-Id`, so a retry never duplicates. Services
        use `llmo.core.outbox.Publisher` instead, which never waits on NATS.
        """
        event = envelope(message, event_id=event_id, subject=subject)
        for attempt in range(retries + 1):
            try:
                return await self.send(event, timeout=timeout)
            except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError):
                if attempt == retries:
                    raise
                await asyncio.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

    async def send(self, event: Envelope, *, timeout: float = 5.0) -> bool:
        """One JetStream publish of an envelope; returns False for a duplicate."""
        [result] = await self.send_many([event], timeout=timeout)
        if isinstance(result, BaseException):
            raise result
        return result

    async def send_many(self, events: Sequence[Envelope], *, timeout: float = 5.0) -> list[bool | BaseException]:
        """Publish envelopes in this order on the wire and wait for their acks together.

        Per event: True when stored, False when JetStream saw its id already, or the error.
        """
        for domain in {domain_of(event.subject) for event in events}:
            await self.ensure_stream(domain)
        acks: list[asyncio.Future[Any] | BaseException] = []
        for event in events:
            try:
                # a copy: nats-py adds its own headers to the dict it is given
                acks.append(await self.js.publish_async(event.subject, event.payload, headers=dict(event.headers)))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # connection lost mid-window: the rest waits for the next try
                acks.extend([error] * (len(events) - len(acks)))
                break
        waited = await asyncio.gather(
            *(asyncio.wait_for(ack, timeout) for ack in acks if not isinstance(ack, BaseException)), return_exceptions=True
        )
        answers = iter(waited)
        results: list[bool | BaseException] = []
        for event, ack in zip(events, acks, strict=True):
            outcome = ack if isinstance(ack, BaseException) else next(answers)
            if isinstance(outcome, BaseException):
                if isinstance(outcome, nats.js.errors.NoStreamResponseError):
                    # the stream was deleted or this is a fresh server: create it again next time
                    self._streams.discard(stream_name(domain_of(event.subject)))
                results.append(outcome)
            else:
                EVENTS_PUBLISHED.labels(event.subject).inc()
                results.append(not outcome.duplicate)
        return results

    def consumer(
        self,
        message_type: type[T],
        durable: str,
        handler: Handler[T],
        **options: Any,
    ) -> Consumer[T]:
        return Consumer(self, message_type, durable, handler, **options)

    async def _on_error(self, error: Exception) -> None:
        # While the server is down nats-py reports every reconnect attempt (about 4 a
        # second): log the first of a run of errors, then one line per ERROR_LOG_EVERY.
        self._errors_since_connect += 1
        if self._errors_since_connect == 1 or self._errors_since_connect % ERROR_LOG_EVERY == 0:
            log.warning("nats error", error=str(error)[:200], errors_in_a_row=self._errors_since_connect)

    async def _on_disconnect(self) -> None:
        self._up.clear()
        log.warning("nats disconnected", url=self.url)

    async def _on_reconnect(self) -> None:
        self._up.set()
        if self._errors_since_connect:
            log.info("nats reconnected", url=self.url, errors_while_down=self._errors_since_connect)
        else:
            log.info("nats reconnected", url=self.url)
        self._errors_since_connect = 0


@dataclass(slots=True)
class Delivery(PulledMessage, Generic[E]):
    """One received event (the pulled message itself, so a batch allocates one object per
    message). Call `reject()` to park it on the dead-letter subject."""

    event: E = None  # type: ignore[assignment]  # set by the consumer's decode before the handler sees it
    rejection: tuple[str, str] | None = None

    @property
    def event_id(self) -> str:
        return getattr(self.event, "event_id", "") or self.header("Nats-Msg-Id")

    def reject(self, reason: str, detail: str = "") -> None:
        self.rejection = (reason, detail)


Handler = Callable[[list[Delivery[E]]], Awaitable[None]]


class Rejected(Exception):
    """Raised by a consumer's `decode`: the message is parked on the dead-letter subject with `reason`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Redeliver:
    """The default failure policy: a failing batch is retried message by message; a message that
    still fails is redelivered with backoff and parked as `max_deliveries_exceeded` once it has
    been delivered `max_deliver` times."""


@dataclass(frozen=True, slots=True)
class RetryInPlace:
    """The failure policy of a handler whose failures are mostly outages (a database): the batch is
    kept (in progress) and retried with backoff; after `max_deliver` attempts its messages are tried
    one by one, twice. One that fails alone while others succeed is parked with `poison_reason`;
    when none succeeds it is an outage, and the batch keeps waiting."""

    poison_reason: str = "handler_error"


FailurePolicy = Redeliver | RetryInPlace


@dataclass(slots=True)
class _Batch(Generic[E]):
    deliveries: list[Delivery[E]]
    # messages parked before the handler: (message, reason, detail)
    rejected: list[tuple[PulledMessage, str, str]]
    # one span per message: deliveries first, then rejected
    spans: tracing.MessageSpans


class Consumer(Generic[E]):
    """A durable JetStream pull consumer over the lean pull connection (`llmo.core.jspull`).

    One pull per batch, the next requested before the current one is handled, and
    two batches in flight: while the handler works on one, the next is collected
    and decoded. Handler calls stay in order. `decode` turns a payload into the
    handler's event (default: `message_type.FromString`); it raises `DecodeError`
    (parked as `malformed_payload`) or `Rejected` (parked with its reason).
    """

    def __init__(
        self,
        bus: EventBus,
        message_type: type[Message],
        durable: str,
        handler: Handler[E],
        *,
        decode: Callable[[bytes], E] | None = None,
        on_failure: FailurePolicy = Redeliver(),
        batch: int = 256,
        max_deliver: int = 5,
        ack_wait: float = 30.0,
        backoff: Sequence[float] = (0.2, 1.0, 5.0),
        fetch_timeout: float = 0.5,
    ) -> None:
        self.bus = bus
        self.message_type = message_type
        self.type_name = message_type.DESCRIPTOR.full_name
        self.subject = subject_of(message_type)
        self.domain = domain_of(self.subject)
        self.stream = stream_name(self.domain)
        self.durable = durable
        self.handler = handler
        self.decode: Callable[[bytes], E] = decode or cast(Callable[[bytes], E], message_type.FromString)
        self.on_failure = on_failure
        self.batch = batch
        self.max_deliver = max_deliver
        self.ack_wait = ack_wait
        self.backoff = tuple(backoff) or (0.0,)
        self.fetch_timeout = fetch_timeout
        self._client = PullClient(bus.url, self.stream, durable, name=f"{bus.name}-{durable}", message_class=Delivery)
        # the llmo-type header as our publishers write it; anything else is parsed properly
        self._type_line = f"\r\nllmo-type: {self.type_name}\r\n".encode()
        self._ack_prefix = f"$JS.ACK.{self.stream}.{durable}."
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_requested = asyncio.Event()

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"consumer:{self.durable}:{self.subject}")
        return self._task

    async def stop(self) -> None:
        """Finish (and ack) the batches in hand, hand back what was prefetched, then stop."""
        self._stopping = True
        self._stop_requested.set()
        if self._task:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def open(self) -> None:
        """Create (or update) the durable and connect the pull connection.

        `run()` does this itself (and again after a lost connection); awaiting it
        before `start()` makes a start-up fail loudly instead."""
        await self.bus.ensure_stream(self.domain)
        await self.bus.ensure_dlq()
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=self.subject,
            # Unlimited at the server: JetStream would silently stop redelivering at its
            # limit. We count deliveries ourselves and park the message on the DLQ.
            max_deliver=-1,
            ack_wait=self.ack_wait,
            max_ack_pending=max(1000, self.batch * 4),
        )
        await self.bus.js.add_consumer(self.stream, config)
        await self._client.connect()

    async def run(self) -> None:
        client = self._client
        pull: str | None = None
        finishing: asyncio.Task[None] | None = None
        try:
            while not self._stopping:
                try:
                    if not client.connected:
                        await self.open()
                        pull = None
                    if pull is None:
                        pull = client.request(self.batch, self.fetch_timeout)
                    messages = cast(list[Delivery[E]], await client.collect(pull, self.fetch_timeout + 2.0))
                    pull = None if self._stopping else client.request(self.batch, self.fetch_timeout)
                    if not messages:
                        continue
                    batch = self._prepare(messages)
                    if finishing is not None:
                        task, finishing = finishing, None
                        if batch.rejected and not task.done():
                            # not behind a handler still at work: a message past its delivery
                            # limit must not wait on a handler that hangs on it
                            await self._park_rejected(batch)
                        await task
                    finishing = asyncio.create_task(self._finish(batch))
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # connection lost, stream not ready yet, server restarting
                    log.warning("consumer loop failed; retrying", consumer=self.durable, error=repr(error))
                    pull = None
                    with contextlib.suppress(Exception):
                        client.nak(client.abandon())
                    await asyncio.sleep(0.5)
            if finishing is not None:
                task, finishing = finishing, None
                with contextlib.suppress(Exception):
                    await task
            with contextlib.suppress(Exception):
                client.nak(client.abandon())
                await client.flush(timeout=2.0)
        finally:
            # cancelled (the consumer "dies"): what it had not acked comes back after ack_wait
            if finishing is not None:
                finishing.cancel()
            await client.close()

    def _prepare(self, messages: list[Delivery[E]]) -> _Batch[E]:
        deliveries: list[Delivery[E]] = []
        rejected: list[tuple[PulledMessage, str, str]] = []
        decode, type_line, expected = self.decode, self._type_line, self.type_name
        ack_prefix, max_deliver = self._ack_prefix, self.max_deliver
        for msg in messages:
            if msg.redelivered(ack_prefix) and msg.deliveries > max_deliver:
                detail = f"delivered {msg.deliveries} times without being acknowledged (does the consumer crash on it?)"
                rejected.append((msg, "max_deliveries_exceeded", detail))
                continue
            try:
                if type_line not in msg.raw_headers:
                    declared = msg.header("llmo-type", expected)
                    if declared != expected:
                        raise DecodeError(f"llmo-type is {declared!r}, expected {expected!r}")
                msg.event = decode(msg.data)
                deliveries.append(msg)
            except DecodeError as error:
                rejected.append((msg, "malformed_payload", str(error)))
            except Rejected as error:
                rejected.append((msg, error.reason, error.detail))
        consumed = itertools.chain(deliveries, (r[0] for r in rejected))
        spans = tracing.message_spans(self.subject, self.durable, (m.header("traceparent") for m in consumed))
        return _Batch(deliveries, rejected, spans)

    async def _park_rejected(self, batch: _Batch[E]) -> None:
        """Park the messages rejected before the handler (once)."""
        rejected, batch.rejected = batch.rejected, []
        for index, (msg, reason, detail) in enumerate(rejected, start=len(batch.deliveries)):
            batch.spans.fail(index, reason)
            await self._dead_letter(msg, msg.header("Nats-Msg-Id"), reason, detail)

    async def _finish(self, batch: _Batch[E]) -> None:
        """Run the handler under the failure policy; then ack, park or leave each message."""
        deliveries, spans = batch.deliveries, batch.spans
        try:
            handed_back: set[int] = set()
            if deliveries:
                with ctx.bind(trace=spans.trace, consumer=self.durable, batch=len(deliveries)):
                    if isinstance(self.on_failure, RetryInPlace):
                        handed_back = await self._retry_in_place(deliveries, self.on_failure.poison_reason)
                    else:
                        handed_back = await self._redeliver_failed(deliveries)
            await self._park_rejected(batch)
            ok: list[Delivery[E]]
            if handed_back:
                ok = [d for d in deliveries if d.rejection is None and id(d) not in handed_back]
            else:
                ok = [d for d in deliveries if d.rejection is None]
            if len(ok) < len(deliveries):
                for index, delivery in enumerate(deliveries):
                    if delivery.rejection is not None:
                        spans.fail(index, delivery.rejection[0])
                        await self._dead_letter(delivery, delivery.event_id, *delivery.rejection)
                    elif id(delivery) in handed_back:
                        spans.fail(index, "redelivered")
            self._client.ack(ok)
            if ok:
                EVENTS_HANDLED.labels(self.durable, "ok").inc(len(ok))
        finally:
            spans.end()

    async def _redeliver_failed(self, deliveries: list[Delivery[E]]) -> set[int]:
        """`Redeliver`: returns the ids of the deliveries handed back for redelivery."""
        try:
            await self.handler(deliveries)
            return set()
        except Exception as error:
            if len(deliveries) == 1:
                return self._hand_back(deliveries[0], error)
            log.warning("batch failed; retrying one by one", consumer=self.durable, size=len(deliveries), error=repr(error))
        handed_back: set[int] = set()
        for delivery in deliveries:
            delivery.rejection = None
            try:
                await self.handler([delivery])
            except Exception as single_error:
                handed_back |= self._hand_back(delivery, single_error)
        return handed_back

    def _hand_back(self, delivery: Delivery[E], error: Exception) -> set[int]:
        """Nak a failed delivery with backoff, or mark it for the DLQ once it used its deliveries."""
        if delivery.deliveries >= self.max_deliver:
            delivery.reject("max_deliveries_exceeded", repr(error))
            return set()
        delay = self.backoff[min(delivery.deliveries - 1, len(self.backoff) - 1)]
        log.warning(
            "event failed; will redeliver",
            consumer=self.durable,
            event_id=delivery.event_id,
            deliveries=delivery.deliveries,
            delay_s=delay,
            error=repr(error),
        )
        EVENTS_HANDLED.labels(self.durable, "retry").inc()
        self._client.nak([delivery], delay=delay)
        return {id(delivery)}

    async def _retry_in_place(self, deliveries: list[Delivery[E]], poison_reason: str) -> set[int]:
        """`RetryInPlace`: nothing is handed back while the consumer runs; a poison message ends up
        rejected. A stop during an outage hands the held batch back (nak, no delay) instead of
        waiting for the outage to end: the next start, or another replica, gets it again."""
        attempt = 0
        while True:
            try:
                await self.handler(deliveries)
                return set()
            except Exception as error:
                attempt += 1
                log.warning("batch failed", consumer=self.durable, size=len(deliveries), attempt=attempt, error=repr(error))
                with contextlib.suppress(Exception):
                    self._client.in_progress(deliveries)
                if attempt >= self.max_deliver and await self._isolate(deliveries, poison_reason):
                    return set()
                if not self._stopping:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop_requested.wait(),
                                               self.backoff[min(attempt - 1, len(self.backoff) - 1)])
                if self._stopping:
                    log.warning("stopping during an outage; batch handed back", consumer=self.durable,
                                size=len(deliveries))
                    for delivery in deliveries:
                        delivery.rejection = None
                    with contextlib.suppress(Exception):
                        self._client.nak(deliveries, delay=0)
                    return {id(d) for d in deliveries}
            for delivery in deliveries:
                delivery.rejection = None

    async def _isolate(self, deliveries: list[Delivery[E]], poison_reason: str) -> bool:
        """Handle deliveries one by one, twice; False when none succeeds (an outage, not a poison message)."""
        pending = list(deliveries)
        errors: dict[int, str] = {}
        succeeded = 0
        for _ in range(2):
            errors = {}
            for delivery in pending:
                delivery.rejection = None
                try:
                    await self.handler([delivery])
                    succeeded += 1
                except Exception as error:
                    errors[id(delivery)] = repr(error)
            pending = [d for d in pending if id(d) in errors]
            if not pending:
                return True
        if succeeded == 0:
            return False
        for delivery in pending:
            delivery.reject(poison_reason, errors[id(delivery)])
        return True

    async def _dead_letter(self, msg: PulledMessage, event_id: str, reason: str, detail: str) -> None:
        """Park a message on `llmo.dlq.<domain>` (published before the original is terminated)."""
        letter = events_pb2.DeadLetter(
            event_id=event_id,
            occurred_at=_now(),
            original_subject=msg.subject,
            consumer=self.durable,
            reason=reason,
            detail=detail[:2000],
            deliveries=msg.deliveries,
            message_type=msg.header("llmo-type"),
            payload=msg.data,
        )
        dlq_id = f"dlq:{self.durable}:{event_id or msg.stream_sequence}"
        await self.bus.ensure_dlq()
        await self.bus.js.publish(
            dlq_subject(self.domain),
            letter.SerializeToString(),
            headers={"Nats-Msg-Id": dlq_id, "llmo-type": letter.DESCRIPTOR.full_name, "llmo-reason": reason},
        )
        self._client.term([msg])
        EVENTS_DEAD_LETTERED.labels(self.durable, reason).inc()
        log.warning("event dead-lettered", consumer=self.durable, event_id=event_id, reason=reason, detail=detail)


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp
