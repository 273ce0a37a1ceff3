"""`llmo.visibility.v1.*` events, announced from the store's `events` table.

An event is written in the same transaction as the state it announces (a crawl's end, a run's
significant change); `EventAnnouncer` then moves unpublished events into the outbox and marks them
published. Event ids are derived from what they announce, so a crash between the outbox write and
the mark republishes the same id and JetStream's duplicate window drops the repeat.
"""

from __future__ import annotations

import asyncio
import contextlib

from google.protobuf.message import Message

from llmo.core.logging import get_logger
from llmo.core.outbox import Publisher
from llmo.protos.events.v1 import events_pb2
from llmo.visibility.storage import EventRow, VisibilityStore

log = get_logger(__name__)
BATCH = 256


def event_row(message: Message) -> EventRow:
    event_id = getattr(message, "event_id")  # noqa: B009 - every event message has one
    return EventRow(event_id=event_id, kind=type(message).__name__,
                    payload=message.SerializeToString(deterministic=True))


def event_message(row: EventRow) -> Message:
    message: Message = getattr(events_pb2, row.kind)()
    message.ParseFromString(row.payload)
    return message


class EventAnnouncer:
    """Publishes recorded events through the outbox; `wake()` after recording some."""

    def __init__(self, store: VisibilityStore, publisher: Publisher | None) -> None:
        self.store = store
        self.publisher = publisher
        self._wake = asyncio.Event()
        self._wake.set()  # events a previous process recorded and did not announce go first

    def wake(self) -> None:
        self._wake.set()

    async def announce_pending(self) -> int:
        total = 0
        while True:
            rows = await asyncio.to_thread(self.store.unpublished_events, BATCH)
            if not rows:
                return total
            if self.publisher is not None:
                for _, row in rows:
                    await self.publisher.publish(event_message(row), event_id=row.event_id)
            await asyncio.to_thread(self.store.mark_events_published, [row_id for row_id, _ in rows])
            total += len(rows)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.announce_pending()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the store or outbox failed: retry shortly, nothing is lost
                log.warning("announcing events failed; retrying", error=repr(error))
                await asyncio.sleep(1.0)
                self._wake.set()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.announce_pending()
