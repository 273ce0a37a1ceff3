"""The evaluation service, declared on the service kit: gRPC EvaluationService over a SQL store of
record, runs executed in the background, online scoring of completed events, drift checks, and
`scored` / `drift_detected` events through the outbox."""

from __future__ import annotations

import asyncio

from llmo.chat_client import ChatClient
from llmo.core import kit as service_kit
from llmo.core.kit import Kit, ServiceSpec
from llmo.embedding import Embedder
from llmo.evaluation.drift import DriftMonitor
from llmo.evaluation.evaluate import StoredSteps
from llmo.evaluation.judge import Judge
from llmo.evaluation.online import CompletedConsumer, OnlineEvaluator, parse_list
from llmo.evaluation.reliability import ReliabilityAssessor
from llmo.evaluation.runs import RunExecutor, Target
from llmo.evaluation.score_events import ScoreAnnouncer
from llmo.evaluation.scoring import Scorer
from llmo.evaluation.servicer import EvaluationServicer
from llmo.evaluation.settings import EvaluationSettings
from llmo.evaluation.storage import EvaluationStore
from llmo.protos.evaluation.v1 import evaluation_service_pb2_grpc

SERVICE_NAME = "llmo.evaluation.v1.EvaluationService"


async def build(kit: Kit[EvaluationSettings]) -> None:
    settings = kit.settings
    sources = parse_list(settings.online_sources, ["router", "inference"], "online_sources")
    database_url = settings.resolved_database_url()
    store = await kit.storage(lambda: EvaluationStore.open(database_url), EvaluationStore.close)
    publisher = kit.outbox_publisher() if settings.publish_events else None
    # MiniLM and the detector load on first use (seconds), not at start.
    embedder = Embedder(max_seq_length=256)
    judge = None
    if settings.judge_url:
        judge_client = ChatClient(settings.judge_url, api_key=settings.judge_api_key, model=settings.judge_model,
                                  timeout_s=settings.judge_timeout_s, max_tokens=1024)
        kit.on_stop(judge_client.close)
        judge = Judge(judge_client, retries=settings.judge_retries, concurrency=settings.judge_concurrency,
                      cache_entries=settings.judge_cache_entries)
    scorer = Scorer(embedder=embedder, judge=judge, judge_model_default=settings.judge_model)
    target = None
    if settings.target_url:
        target_client = ChatClient(settings.target_url, api_key=settings.judge_api_key, model="auto",
                                   timeout_s=settings.target_timeout_s, max_tokens=settings.target_max_tokens)
        kit.on_stop(target_client.close)
        target = Target(target_client)
    announcer = ScoreAnnouncer(store, publisher)
    steps = StoredSteps(store)
    runs = RunExecutor(store, scorer, settings, announcer, target, steps)
    drift = DriftMonitor(store, settings, publisher)
    reliability = ReliabilityAssessor(store, scorer, steps)
    servicer = EvaluationServicer(store, scorer, settings, runs, announcer, reliability, drift)
    kit.task("runs", runs.run)
    kit.task("scores", announcer.run)
    kit.on_stop(announcer.close)
    kit.task("drift", drift.run)
    online = None
    if settings.consume_events:
        # Live traffic is scored locally unless the judge is asked for: no judge cost per request.
        online_scorer = scorer if settings.online_use_judge else Scorer(embedder=embedder, judge=None,
                                                                         judge_model_default=settings.judge_model)
        online = OnlineEvaluator(store, online_scorer, embedder, settings, announcer)
        bus = kit.event_bus()
        for source in sources:
            kit.consumer(CompletedConsumer(bus, online, source, f"{settings.consumer_name}-{source}"))
    kit.grpc(evaluation_service_pb2_grpc.add_EvaluationServiceServicer_to_server, servicer, SERVICE_NAME)
    kit.expose(store=store, servicer=servicer, runs=runs, drift=drift, online=online, announcer=announcer,
               scorer=scorer)


SERVICE = ServiceSpec("evaluation", EvaluationSettings, build)
RunningEvaluation = Kit[EvaluationSettings]


async def start(settings: EvaluationSettings, *, port: int | None = None, metrics: bool = True) -> RunningEvaluation:
    """Start the evaluation service and return its handle; ``port=0`` binds a free port."""
    return await service_kit.start_service(SERVICE, settings, port=port, metrics=metrics)


async def serve(settings: EvaluationSettings | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    await service_kit.serve(SERVICE, settings)


if __name__ == "__main__":
    asyncio.run(serve())
