"""`llmo.evaluation.v1.scored`: every score the service produces, announced from the `scores` table.

A score is first written to the store (with the run result, or with the live request it scores);
`ScoreAnnouncer` then moves unpublished scores into the outbox and marks them published. Event ids
are derived from what was scored (`run/<run>/<example>/<metric>`, `online/<source>/<request>/<metric>`,
`evaluate/<request>/<metric>`), so a crash between the outbox write and the mark republishes the same
id and the repeat is dropped downstream.
"""

from __future__ import annotations

import asyncio
import contextlib

from llmo.core.logging import get_logger
from llmo.core.outbox import Publisher
from llmo.core.resources import timestamp
from llmo.evaluation.storage import EvaluationStore, ScoreRow
from llmo.protos.common.v1 import common_pb2
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb
from llmo.protos.events.v1 import events_pb2

log = get_logger(__name__)
BATCH = 256


def score_row(result: pb.MetricResult, *, event_id: str, source: str, occurred_us: int,
              attribution: common_pb2.Attribution, model: str = "", prompt_version: str = "", request_id: str = "",
              run: str = "", example: str = "") -> ScoreRow:
    event = events_pb2.EvaluationScored(
        event_id=event_id, request_id=request_id, occurred_at=timestamp(occurred_us), attribution=attribution,
        model=model, prompt_version=prompt_version, metric=result.metric, score=result.score, source=source,
        run=run, example=example, judged_by=result.judged_by)
    return ScoreRow(event_id=event_id, tenant=attribution.tenant, source=source, metric=result.metric,
                    score=result.score, model=model, prompt_version=prompt_version, request_id=request_id,
                    occurred_us=occurred_us, event=event.SerializeToString(deterministic=True))


class ScoreAnnouncer:
    """Publishes recorded scores through the outbox; `wake()` after recording some."""

    def __init__(self, store: EvaluationStore, publisher: Publisher | None) -> None:
        self.store = store
        self.publisher = publisher
        self._wake = asyncio.Event()
        self._wake.set()  # scores a previous run recorded and did not announce go first

    def wake(self) -> None:
        self._wake.set()

    async def announce_pending(self) -> int:
        """Publish every unpublished score; returns how many."""
        total = 0
        while True:
            rows = await asyncio.to_thread(self.store.unpublished, BATCH)
            if not rows:
                return total
            if self.publisher is not None:
                for _, event_id, payload in rows:
                    await self.publisher.publish(events_pb2.EvaluationScored.FromString(payload), event_id=event_id)
            await asyncio.to_thread(self.store.mark_published, [row_id for row_id, _, _ in rows])
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
                log.warning("announcing scores failed; retrying", error=repr(error))
                await asyncio.sleep(1.0)
                self._wake.set()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.announce_pending()
