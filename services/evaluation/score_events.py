"""`llmo.evaluation.v1.scored`: every score the service produces, announced from the `scores` table.

A score is first written to the store (with the run result, or with the live request it scores);
`ScoreAnnouncer` (an `llmo.core.announcer.StoredEventAnnouncer`) then moves unpublished scores into the
outbox and marks them published. Event ids
are derived from what was scored (`run/<run>/<example>/<metric>`, `online/<source>/<request>/<metric>`,
`evaluate/<request>/<metric>`), so a crash between the outbox write and the mark republishes the same
id and the repeat is dropped downstream.
"""

from __future__ import annotations

from llmo.core.announcer import PendingEvent, StoredEventAnnouncer
from llmo.core.outbox import Publisher
from llmo.core.resources import timestamp
from llmo.evaluation.storage import EvaluationStore, ScoreRow
from llmo.protos.common.v1 import common_pb2
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb
from llmo.protos.events.v1 import events_pb2


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


class ScoreAnnouncer(StoredEventAnnouncer):
    """Publishes recorded scores through the outbox; `wake()` after recording some."""

    def __init__(self, store: EvaluationStore, publisher: Publisher | None) -> None:
        def fetch(limit: int) -> list[PendingEvent]:
            return [(row_id, event_id, events_pb2.EvaluationScored.FromString(payload))
                    for row_id, event_id, payload in store.unpublished(limit)]

        super().__init__(fetch, store.mark_published, publisher, what="scores")
        self.store = store
