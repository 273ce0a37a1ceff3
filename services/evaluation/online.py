"""Online evaluation: a sample of live completions scored and announced as `llmo.evaluation.v1.scored`.

Consumes `llmo.router.v1.completed` and `llmo.inference.v1.completed`; only events that carry their
content (the router and inference services fill `content` for a configurable sample of requests)
can be scored. A request is picked when a hash of its request id falls below
`online_sample_rate`, so every replica picks the same ones. Each picked request is scored with
`online_metrics` (the context metrics only when the event carries contexts), locally by default
(the faithfulness detector and MiniLM: no judge cost on live traffic), and its scores are recorded
with the request's input features (for drift) in one transaction, which also makes a redelivered
event a no-op. The scores' events carry the request id, so the router's bandits credit the arm that
served the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmo.core import context as ctx
from llmo.core.content import sampled
from llmo.core.events import Delivery, EventBus
from llmo.core.logging import get_logger
from llmo.embedding import Embedder
from llmo.evaluation.evaluate import ResolvedMetric, score_case
from llmo.evaluation.score_events import ScoreAnnouncer, score_row
from llmo.evaluation.scoring import Case, Scorer, metric_name
from llmo.evaluation.settings import EvaluationSettings
from llmo.evaluation.storage import EvaluationStore, ScoredRequest, now_us
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb
from llmo.protos.events.v1 import events_pb2

log = get_logger(__name__)

ONLINE_METRICS = {
    "answer_relevancy": pb.METRIC_ANSWER_RELEVANCY,
    "faithfulness": pb.METRIC_FAITHFULNESS,
    "hallucination": pb.METRIC_HALLUCINATION,
    "context_relevancy": pb.METRIC_CONTEXT_RELEVANCY,
}
NEEDS_CONTEXTS = {"faithfulness", "hallucination", "context_relevancy"}
SOURCES = {"router": events_pb2.RouterCompleted, "inference": events_pb2.InferenceCompleted}


def parse_list(value: str, allowed: Sequence[str], knob: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"{knob}: unknown {unknown[0]!r}; choose from {', '.join(allowed)}")
    return names


class OnlineEvaluator:
    def __init__(self, store: EvaluationStore, scorer: Scorer, embedder: Embedder, settings: EvaluationSettings,
                 announcer: ScoreAnnouncer) -> None:
        self.store, self.scorer, self.embedder, self.settings = store, scorer, embedder, settings
        self.announcer = announcer
        self.metrics = [ResolvedMetric(pb.MetricSpec(metric=ONLINE_METRICS[name]),
                                       metric_name(pb.MetricSpec(metric=ONLINE_METRICS[name])))
                        for name in parse_list(settings.online_metrics, list(ONLINE_METRICS), "online_metrics")]
        self.judge = pb.JudgeConfig(local_detector=not settings.online_use_judge)

    async def score_event(self, source: str, event: Any) -> int:
        """Score one completed event; returns how many scores were recorded (0: skipped or seen before)."""
        content = event.content
        if not event.request_id or not content.input.strip() or not content.output.strip():
            return 0
        if not sampled(event.request_id, self.settings.online_sample_rate):
            return 0
        tenant = event.attribution.tenant
        if await asyncio.to_thread(self.store.was_scored, tenant, source, event.request_id):
            return 0
        contexts = tuple(content.contexts)
        metrics = [m for m in self.metrics if contexts or m.name not in NEEDS_CONTEXTS]
        if not metrics:
            return 0
        case = Case(input=content.input, output=content.output, contexts=contexts)
        with ctx.bind(tenant=tenant, request_id=f"online/{event.request_id}"):
            scored = await score_case(self.scorer, case, metrics, self.judge, tenant=tenant,
                                      request_id=f"online/{event.request_id}")
        for name, error in scored.errors.items():
            log.info("online metric failed", metric=name, reason=error.reason, request_id=event.request_id)
        occurred = event.occurred_at.ToMicroseconds() if event.occurred_at.seconds else now_us()
        rows = [score_row(r, event_id=f"online/{source}/{tenant}/{event.request_id}/{r.metric}", source="online",
                          occurred_us=occurred, attribution=event.attribution, model=event.model,
                          prompt_version=getattr(event, "prompt_version", ""), request_id=event.request_id)
                for r in scored.results]
        vector = await asyncio.to_thread(self.embedder.encode, [content.input])
        request = ScoredRequest(tenant=tenant, source=source, request_id=event.request_id, model=event.model,
                                prompt_version=getattr(event, "prompt_version", ""), input_chars=len(content.input),
                                output_chars=len(content.output),
                                embedding=np.asarray(vector[0], dtype=np.float32).tobytes(), occurred_us=occurred)
        if not await asyncio.to_thread(self.store.record_scores, rows, request):
            return 0
        self.announcer.wake()
        return len(rows)


class CompletedConsumer:
    """One durable consumer of a completed subject feeding the `OnlineEvaluator`."""

    def __init__(self, bus: EventBus, evaluator: OnlineEvaluator, source: str, durable: str) -> None:
        self.evaluator, self.source = evaluator, source
        # Small batches: each event costs a MiniLM pass (tens of ms), and a batch must finish within ack_wait.
        self.consumer = bus.consumer(SOURCES[source], durable, self.handle, batch=16, ack_wait=60.0)

    async def start(self) -> None:
        await self.consumer.bus.ensure_stream(self.source)
        await self.consumer.bus.ensure_stream("evaluation")
        self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()

    async def handle(self, deliveries: list[Delivery[Any]]) -> None:
        for delivery in deliveries:
            try:
                await self.evaluator.score_event(self.source, delivery.event)
            except ValueError as error:  # content the scorer cannot read (e.g. past its bounds)
                delivery.reject("unscorable_content", str(error))


__all__ = ["SOURCES", "CompletedConsumer", "OnlineEvaluator", "parse_list", "sampled"]
