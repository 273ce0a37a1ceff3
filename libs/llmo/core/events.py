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
- `Consumer` is a durable pull consumer: it hands batches to an async handler
  and acks only after the handler returns (the handler commits its side effect
  first). A failing batch is retried message by message so one poison message
  cannot stop the others; a message that keeps failing is redelivered with
  backoff up to `max_deliver` times, then parked on `llmo.dlq.<domain>` as a
  `DeadLetter` with the reason. Handlers must be idempotent on `event_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import nats
import nats.errors
import nats.js.errors
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from llmo.core import context as ctx
from llmo.core import tracing
from llmo.core.logging import get_logger
from llmo.core.metrics import EVENTS_DEAD_LETTERED, EVENTS_HANDLED, EVENTS_PUBLISHED
from llmo.protos.events.v1 import events_pb2

log = get_logger(__name__)

T = TypeVar("T", bound=Message)

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


@dataclass
class Delivery(Generic[T]):
    """One received event. Call `reject()` to park it on the dead-letter subject."""

    event: T
    event_id: str
    subject: str
    deliveries: int
    headers: dict[str, str]
    msg: Msg = field(repr=False)
    rejection: tuple[str, str] | None = None

    def reject(self, reason: str, detail: str = "") -> None:
        self.rejection = (reason, detail)


Handler = Callable[[list[Delivery[T]]], Awaitable[None]]


class Consumer(Generic[T]):
    def __init__(
        self,
        bus: EventBus,
        message_type: type[T],
        durable: str,
        handler: Handler[T],
        *,
        batch: int = 256,
        max_deliver: int = 5,
        ack_wait: float = 30.0,
        backoff: Sequence[float] = (0.2, 1.0, 5.0),
        fetch_timeout: float = 0.5,
    ) -> None:
        self.bus = bus
        self.message_type = message_type
        self.subject = subject_of(message_type)
        self.domain = domain_of(self.subject)
        self.durable = durable
        self.handler = handler
        self.batch = batch
        self.max_deliver = max_deliver
        self.ack_wait = ack_wait
        self.backoff = tuple(backoff)
        self.fetch_timeout = fetch_timeout
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"consumer:{self.durable}:{self.subject}")
        return self._task

    async def stop(self) -> None:
        """Finish the batch in hand (ack it), then stop."""
        self._stopping = True
        if self._task:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run(self) -> None:
        subscription = None
        while not self._stopping:
            try:
                if subscription is None:
                    subscription = await self._subscribe()
                messages = await subscription.fetch(self.batch, timeout=self.fetch_timeout)
            except nats.errors.TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as error:  # connection lost, stream not ready yet, server restarting
                log.warning("consumer fetch failed; retrying", consumer=self.durable, error=repr(error))
                await asyncio.sleep(0.5)
                continue
            await self.process(messages)

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        stream = await self.bus.ensure_stream(self.domain)
        await self.bus.ensure_dlq()
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            # Unlimited at the server: JetStream would silently stop redelivering at its
            # limit. We count deliveries ourselves and park the message on the DLQ.
            max_deliver=-1,
            ack_wait=self.ack_wait,
            filter_subject=self.subject,
            max_ack_pending=max(1000, self.batch * 4),
        )
        return await self.bus.js.pull_subscribe(self.subject, durable=self.durable, stream=stream, config=config)

    async def process(self, messages: list[Msg]) -> None:
        deliveries: list[Delivery[T]] = []
        for msg in messages:
            decoded = self._decode(msg)
            if not isinstance(decoded, Delivery):
                await self._dead_letter(msg, *decoded)
            elif decoded.deliveries > self.max_deliver:
                # Delivered too often without an ack (e.g. it crashes the consumer every time).
                await self._dead_letter(msg, decoded.event_id, "max_deliveries_exceeded", "never acknowledged")
            else:
                deliveries.append(decoded)
        if not deliveries:
            return
        try:
            await self._handle(deliveries)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if len(deliveries) == 1:
                await self._failed(deliveries[0], error)
                return
            log.warning("batch failed; retrying one by one", consumer=self.durable, size=len(deliveries), error=repr(error))
            for delivery in deliveries:
                delivery.rejection = None
                try:
                    await self._handle([delivery])
                except asyncio.CancelledError:
                    raise
                except Exception as single_error:
                    await self._failed(delivery, single_error)

    async def _handle(self, deliveries: list[Delivery[T]]) -> None:
        spans = tracing.message_spans(self.subject, self.durable, (d.headers.get("traceparent") for d in deliveries))
        try:
            with ctx.bind(trace=spans.trace, consumer=self.durable, batch=len(deliveries)):
                await self.handler(deliveries)
            for index, delivery in enumerate(deliveries):
                if delivery.rejection:
                    spans.fail(index, delivery.rejection[0])
                    await self._dead_letter(delivery.msg, delivery.event_id, *delivery.rejection)
                else:
                    await delivery.msg.ack()
                    EVENTS_HANDLED.labels(self.durable, "ok").inc()
        except BaseException as error:
            spans.end(error)
            raise
        spans.end()

    def _decode(self, msg: Msg) -> Delivery[T] | tuple[str, str, str]:
        """The delivery, or (event id, reason, detail) when the payload is unreadable."""
        headers = dict(msg.headers or {})
        event_id = headers.get("Nats-Msg-Id", "")
        expected = self.message_type.DESCRIPTOR.full_name
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        try:
            declared = headers.get("llmo-type", expected)
            if declared != expected:
                raise DecodeError(f"llmo-type is {declared!r}, expected {expected!r}")
            event = self.message_type.FromString(msg.data)
        except DecodeError as error:
            return (event_id, "malformed_payload", str(error))
        event_id = getattr(event, "event_id", "") or event_id
        return Delivery(event, event_id, msg.subject, delivered, headers, msg)

    async def _failed(self, delivery: Delivery[T], error: Exception) -> None:
        if delivery.deliveries >= self.max_deliver:
            await self._dead_letter(delivery.msg, delivery.event_id, "max_deliveries_exceeded", repr(error))
            return
        delay = self.backoff[min(delivery.deliveries - 1, len(self.backoff) - 1)] if self.backoff else 0
        log.warning(
            "event failed; will redeliver",
            consumer=self.durable,
            event_id=delivery.event_id,
            deliveries=delivery.deliveries,
            delay_s=delay,
            error=repr(error),
        )
        EVENTS_HANDLED.labels(self.durable, "retry").inc()
        await delivery.msg.nak(delay=delay)

    async def _dead_letter(self, msg: Msg, event_id: str, reason: str, detail: str) -> None:
        headers = dict(msg.headers or {})
        letter = events_pb2.DeadLetter(
            event_id=event_id,
            occurred_at=_now(),
            original_subject=msg.subject,
            consumer=self.durable,
            reason=reason,
            detail=detail[:2000],
            deliveries=msg.metadata.num_delivered if msg.metadata else 1,
            message_type=headers.get("llmo-type", ""),
            payload=msg.data,
        )
        dlq_id = f"dlq:{self.durable}:{event_id or msg.metadata.sequence.stream}"
        await self.bus.ensure_dlq()
        await self.bus.js.publish(
            dlq_subject(self.domain),
            letter.SerializeToString(),
            headers={"Nats-Msg-Id": dlq_id, "llmo-type": letter.DESCRIPTOR.full_name, "llmo-reason": reason},
        )
        await msg.term()
        EVENTS_DEAD_LETTERED.labels(self.durable, reason).inc()
        log.warning("event dead-lettered", consumer=self.durable, event_id=event_id, reason=reason, detail=detail)


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp
