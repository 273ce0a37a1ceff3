"""Publishing events that a service first recorded in its own store (a transactional outbox of its own).

A service writes an event row in the same transaction as the state the event announces; a
`StoredEventAnnouncer` then moves unpublished rows into the platform outbox and marks them
published. Event ids are derived from what they announce, so a crash between the outbox write
and the mark republishes the same id, and JetStream's duplicate window drops the repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from google.protobuf.message import Message

from llmo.core.logging import get_logger
from llmo.core.outbox import Publisher

log = get_logger(__name__)
BATCH = 256

# (row id, event id, the event) of an unpublished row
PendingEvent = tuple[int, str, Message]


class StoredEventAnnouncer:
    """Publishes recorded events through the outbox; `wake()` after recording some.

    `fetch(limit)` returns up to `limit` unpublished rows, oldest first, and `mark(row_ids)` marks
    them published; both block (they run on a worker thread).
    """

    def __init__(self, fetch: Callable[[int], Sequence[PendingEvent]], mark: Callable[[list[int]], None],
                 publisher: Publisher | None, *, what: str = "events") -> None:
        self.fetch = fetch
        self.mark = mark
        self.publisher = publisher
        self.what = what
        self._wake = asyncio.Event()
        self._wake.set()  # rows a previous process recorded and did not announce go first

    def wake(self) -> None:
        self._wake.set()

    async def announce_pending(self) -> int:
        """Publish every unpublished row; returns how many."""
        total = 0
        while True:
            rows = await asyncio.to_thread(self.fetch, BATCH)
            if not rows:
                return total
            if self.publisher is not None:
                for _, event_id, message in rows:
                    await self.publisher.publish(message, event_id=event_id)
            await asyncio.to_thread(self.mark, [row_id for row_id, _, _ in rows])
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
                log.warning("announcing stored events failed; retrying", what=self.what, error=repr(error))
                await asyncio.sleep(1.0)
                self._wake.set()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.announce_pending()
