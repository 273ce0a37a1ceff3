"""`llmo.visibility.v1.*` events, announced from the store's `events` table.

An event is written in the same transaction as the state it announces (a crawl's end, a run's
significant change); `EventAnnouncer` (an `llmo.core.announcer.StoredEventAnnouncer`) then moves
unpublished events into the outbox and marks them published. Event ids are derived from what they
announce, so a crash between the outbox write and the mark republishes the same id and JetStream's
duplicate window drops the repeat.
"""

from __future__ import annotations

from google.protobuf.message import Message

from llmo.core.announcer import PendingEvent, StoredEventAnnouncer
from llmo.core.outbox import Publisher
from llmo.protos.events.v1 import events_pb2
from llmo.visibility.storage import EventRow, VisibilityStore


def event_row(message: Message) -> EventRow:
    event_id = getattr(message, "event_id")  # noqa: B009 - every event message has one
    return EventRow(event_id=event_id, kind=type(message).__name__,
                    payload=message.SerializeToString(deterministic=True))


def event_message(row: EventRow) -> Message:
    message: Message = getattr(events_pb2, row.kind)()
    message.ParseFromString(row.payload)
    return message


class EventAnnouncer(StoredEventAnnouncer):
    """Publishes recorded events through the outbox; `wake()` after recording some."""

    def __init__(self, store: VisibilityStore, publisher: Publisher | None) -> None:
        def fetch(limit: int) -> list[PendingEvent]:
            return [(row_id, row.event_id, event_message(row)) for row_id, row in store.unpublished_events(limit)]

        super().__init__(fetch, store.mark_events_published, publisher)
        self.store = store
