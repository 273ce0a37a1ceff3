"""The one publish policy of every service: a durable outbox in front of JetStream.

`Publisher.publish()` returns once the event is written to a local SQLite file
(`<data_dir>/outbox/<service>.db`, WAL, fsync'd): it never waits on NATS, so a
user's request is never slowed or failed by an outage. One drainer task sends
the outbox to JetStream in order, with the event id as `Nats-Msg-Id` and the
headers captured at publish time, and deletes each event once JetStream has
acknowledged it. While NATS is down, slow or not yet connected the events wait
on disk and are retried with backoff; on stop the outbox is flushed for a
bounded time and whatever is left is sent on the next start.

A re-send after a lost ack is dropped by JetStream's duplicate window, and
consumers are idempotent on the event id anyway, so the guarantee is
at-least-once on the wire and exactly-once in every ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import nats.errors
import nats.js.errors
from google.protobuf.message import Message

from llmo.core.events import Envelope, EventBus, envelope
from llmo.core.logging import get_logger
from llmo.core.metrics import OUTBOX_APPEND_LATENCY, OUTBOX_DEPTH, OUTBOX_OLDEST_AGE, OUTBOX_PUBLISH_FAILURES
from llmo.core.settings import ServiceSettings

log = get_logger(__name__)

R = TypeVar("R")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    event_id TEXT NOT NULL,
    headers TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL
)
"""


def outbox_path(data_dir: Path, service: str) -> Path:
    return Path(data_dir) / "outbox" / f"{service}.db"


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    event: Envelope
    created: float


class OutboxStore:
    """The SQLite file. Not thread-safe: `Publisher` calls it from one thread only."""

    def __init__(self, path: Path, *, synchronous: Literal["FULL", "NORMAL"] = "FULL") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: an event publish() reported written survives a power cut, not only a crash.
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(_SCHEMA)
        self.depth = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self.oldest = self._oldest()

    def _oldest(self) -> float | None:
        row = self._db.execute("SELECT created FROM outbox ORDER BY seq LIMIT 1").fetchone()
        return float(row[0]) if row else None

    def append(self, events: Sequence[tuple[Envelope, float]]) -> tuple[int, float | None]:
        """Write events in one transaction; returns (depth, oldest created) after it."""
        rows = [(e.subject, e.event_id, json.dumps(e.headers), e.payload, created) for e, created in events]
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO outbox (subject, event_id, headers, payload, created) VALUES (?, ?, ?, ?, ?)", rows
            )
        if self.depth == 0 and rows:
            self.oldest = rows[0][4]
        self.depth += len(rows)
        return self.depth, self.oldest

    def head(self, limit: int) -> list[Entry]:
        rows = self._db.execute(
            "SELECT seq, subject, event_id, headers, payload, created FROM outbox ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        return [Entry(seq, Envelope(subject, event_id, json.loads(headers), bytes(payload)), created)
                for seq, subject, event_id, headers, payload, created in rows]

    def delete(self, seqs: Sequence[int]) -> tuple[int, float | None]:
        """Delete sent events; returns (depth, oldest created) after it."""
        if seqs:
            with self._db:
                self._db.execute("BEGIN")
                deleted = self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs]).rowcount
            self.depth = max(0, self.depth - deleted)
            self.oldest = self._oldest()
        return self.depth, self.oldest

    def close(self) -> None:
        self._db.close()


def _failure_reason(error: BaseException) -> str:
    if isinstance(error, nats.errors.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(error, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        return "no_stream"
    if isinstance(error, nats.errors.ConnectionClosedError | nats.errors.ConnectionReconnectingError):
        return "disconnected"
    return "error"


class Publisher:
    """Publishes a service's events through its outbox (see the module docstring)."""

    def __init__(
        self,
        bus: EventBus,
        path: Path,
        *,
        service: str,
        batch: int = 128,
        publish_timeout_s: float = 2.0,
        flush_s: float = 5.0,
        max_backoff_s: float = 5.0,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:
        self.bus = bus
        self.path = Path(path)
        self.service = service
        self.batch = batch
        self.publish_timeout_s = publish_timeout_s
        self.flush_s = flush_s
        self.max_backoff_s = max_backoff_s
        self.synchronous = synchronous
        # One thread owns the SQLite connection, so writes and deletes are serialized
        # without locks and their results arrive in the order they were made.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"outbox-{service}")
        self._store: OutboxStore | None = None
        self._queue: list[tuple[Envelope, float, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._empty = asyncio.Event()
        self._depth = 0
        self._oldest: float | None = None
        self._closed = False
        self._failing = False

    @classmethod
    def for_service(cls, settings: ServiceSettings, bus: EventBus) -> Publisher:
        """The publisher of a service, its outbox under the platform's data directory."""
        return cls(bus, outbox_path(settings.platform.data_dir, settings.service), service=settings.service)

    @property
    def depth(self) -> int:
        """Events written and not yet acknowledged by JetStream."""
        return self._depth

    async def start(self) -> Publisher:
        """Open the outbox and start sending it (what a previous run left is sent first)."""
        self._store = await self._run(OutboxStore, self.path, synchronous=self.synchronous)
        self._set_stats(self._store.depth, self._store.oldest)
        OUTBOX_OLDEST_AGE.labels(self.service).set_function(self._oldest_age)
        if self._depth:
            log.info("outbox holds events from a previous run; sending them", service=self.service, depth=self._depth)
        self._drainer = asyncio.create_task(self._drain(), name=f"outbox:{self.service}")
        self._wake.set()
        return self

    async def publish(self, message: Message, *, event_id: str | None = None, subject: str | None = None) -> str:
        """Write the event to the outbox and return its id; JetStream gets it as soon as it can."""
        if self._closed or self._store is None:
            raise RuntimeError(f"the {self.service} publisher is not running")
        started = time.perf_counter()
        event = envelope(message, event_id=event_id, subject=subject)
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((event, time.time(), written))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name=f"outbox-write:{self.service}")
        await written
        OUTBOX_APPEND_LATENCY.labels(self.service).observe(time.perf_counter() - started)
        return event.event_id

    async def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until everything published so far is in JetStream."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if self._writer is not None and not self._writer.done():
                await asyncio.wait({self._writer}, timeout=max(0.0, remaining))
            elif self._depth:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._empty.wait(), max(0.0, remaining))
            if self._depth == 0 and not self._queue:
                return True
            if loop.time() >= deadline:
                return False

    async def stop(self, timeout: float | None = None) -> None:
        """Flush for a bounded time, then stop; what is left stays on disk for the next start."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        await self.flush(self.flush_s if timeout is None else timeout)
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        if self._depth:
            log.warning("outbox not empty at stop; sending it on the next start", service=self.service, depth=self._depth)
        if self._store is not None:
            await self._run(self._store.close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., R], *args: object, **kwargs: object) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def _set_stats(self, depth: int, oldest: float | None) -> None:
        self._depth, self._oldest = depth, oldest
        OUTBOX_DEPTH.labels(self.service).set(depth)
        if depth == 0:
            self._empty.set()
        else:
            self._empty.clear()

    def _oldest_age(self) -> float:
        return max(0.0, time.time() - self._oldest) if self._depth and self._oldest is not None else 0.0

    async def _write(self) -> None:
        # Group commit: everything queued while one transaction is being written
        # goes into the next one, so one fsync serves many concurrent publishes.
        assert self._store is not None
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                stats = await self._run(self._store.append, [(event, created) for event, created, _ in batch])
            except Exception as error:
                log.error("outbox write failed", service=self.service, events=len(batch), error=repr(error))
                for _, _, written in batch:
                    if not written.done():
                        written.set_exception(error)
                continue
            self._set_stats(*stats)
            for _, _, written in batch:
                if not written.done():
                    written.set_result(None)
            self._wake.set()

    async def _drain(self) -> None:
        backoff = 0.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                try:
                    more, error = await self._drain_once()
                except asyncio.CancelledError:
                    raise
                except Exception as unexpected:  # the outbox file itself failing: keep trying
                    more, error = True, unexpected
                if error is None:
                    if self._failing:
                        log.info("outbox publishing again", service=self.service, depth=self._depth)
                    self._failing, backoff = False, 0.0
                    if not more:
                        break
                    continue
                if not self._failing:
                    log.warning("outbox publish failed; events wait on disk and are retried",
                                service=self.service, depth=self._depth, error=repr(error))
                self._failing = True
                backoff = min(self.max_backoff_s, max(0.1, backoff * 2))
                await asyncio.sleep(backoff)

    async def _drain_once(self) -> tuple[bool, BaseException | None]:
        """Send the next window of the outbox; returns whether there was one, and the first error."""
        assert self._store is not None
        if not self.bus.connected:
            await self.bus.wait_connected()
        entries = await self._run(self._store.head, self.batch)
        if not entries:
            return False, None
        sent, error = await self._send(entries)
        if sent:
            self._set_stats(*await self._run(self._store.delete, sent))
        return True, error

    async def _send(self, entries: list[Entry]) -> tuple[list[int], BaseException | None]:
        """Send a window of events; returns the sequence numbers JetStream stored, and the first error."""
        results = await self.bus.send_many([entry.event for entry in entries], timeout=self.publish_timeout_s)
        sent: list[int] = []
        first: BaseException | None = None
        for entry, result in zip(entries, results, strict=True):
            if isinstance(result, BaseException):
                OUTBOX_PUBLISH_FAILURES.labels(self.service, _failure_reason(result)).inc()
                first = first or result
            else:
                sent.append(entry.seq)
        return sent, first
