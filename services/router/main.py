"""The router service, declared on the service kit: gRPC RouterService (50051),
OpenAI-compatible HTTP (8080), portfolio hot reload, events through the outbox
and the evaluation-score consumer."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from llmo.core import kit as service_kit
from llmo.core.kit import Kit, ServiceSpec
from llmo.embedding import Embedder
from llmo.protos.router.v1 import router_service_pb2_grpc
from llmo.router.bandit import BanditStore
from llmo.router.cache import SemanticCache
from llmo.router.default_portfolio import ensure_portfolio
from llmo.router.experiments import ExperimentStore
from llmo.router.feedback import FeedbackRecorder
from llmo.router.gateway import Gateway
from llmo.router.http_api import OpenAIFront
from llmo.router.integrations import (
    CostBudgetChecker,
    LearnedScorer,
    NatsEventSink,
    ScoreConsumer,
    encoder_of,
)
from llmo.router.lingua import SurprisalPruner, default_model_dir
from llmo.router.portfolio import PortfolioStore
from llmo.router.prompts import PromptRegistry
from llmo.router.servicer import RouterServicer
from llmo.router.settings import RouterSettings
from llmo.router.store import open_store

SERVICE_NAME = "llmo.router.v1.RouterService"


def _pruner(settings: RouterSettings) -> SurprisalPruner | None:
    if settings.compression_model_dir.lower() == "none":
        return None
    directory = Path(settings.compression_model_dir) if settings.compression_model_dir else default_model_dir()
    return SurprisalPruner(directory) if directory is not None else None


async def build(kit: Kit[RouterSettings]) -> None:
    settings = kit.settings
    store = PortfolioStore(ensure_portfolio(settings))
    engine = await kit.storage(lambda: open_store(settings.resolved_database_url()), lambda e: e.dispose())
    bandit = BanditStore(engine)
    experiments = ExperimentStore(engine, bandit)
    embedder = Embedder(cache_dir=None)
    learned = None
    if settings.learned_router_dir:
        learned = await asyncio.to_thread(
            LearnedScorer.load, Path(settings.learned_router_dir), embedder, store.current.routing.strong_share
        )

        def _share(p: Any) -> None:
            assert learned is not None
            learned.strong_share = p.routing.strong_share

        store._on_change = _share
    cache = None
    if settings.cache_enabled:
        cache = SemanticCache(
            encoder_of(embedder),
            ttl_s=settings.cache_ttl_s,
            similarity_threshold=settings.cache_similarity,
            max_entries_per_tenant=settings.cache_max_entries,
        )
    publisher = kit.outbox_publisher() if settings.events else None
    budget = None
    if settings.cost_target:
        budget = CostBudgetChecker(settings.cost_target, settings.budget_timeout_s, settings.cost_api_key)
        kit.on_stop(budget.close)
    gateway = Gateway(
        lambda: store.current,
        bandit=bandit,
        prompts=PromptRegistry(engine),
        experiments=experiments,
        learned=learned,
        cache=cache,
        budget=budget,
        events=NatsEventSink(publisher, lambda: store.current, content_sample=settings.event_content_sample)
        if publisher is not None else None,
        encoder=encoder_of(embedder),
        hedge_after_s=settings.hedge_after_ms / 1000.0,
    )
    gateway.pruner = _pruner(settings)
    kit.on_stop(gateway.close)
    feedback = FeedbackRecorder(engine, bandit, experiments)
    if settings.events:
        kit.consumer(ScoreConsumer(kit.event_bus(), feedback, f"{settings.consumer_name}-scores",
                                   settings.reward_metrics))
    kit.task("portfolio-watch", lambda: store.watch(settings.portfolio_reload_s))
    kit.grpc(router_service_pb2_grpc.add_RouterServiceServicer_to_server, RouterServicer(gateway, feedback), SERVICE_NAME)
    front = OpenAIFront(gateway, settings.platform, max_body_bytes=settings.max_body_bytes)
    kit.http(max_body_bytes=settings.max_body_bytes).add_routes(front.routes())
    kit.expose(gateway=gateway, portfolio=store, engine=engine, budget=budget)


SERVICE = ServiceSpec("router", RouterSettings, build)
RunningRouter = Kit[RouterSettings]


async def start(
    settings: RouterSettings, *, port: int | None = None, http_port: int | None = None, metrics: bool = True
) -> Kit[RouterSettings]:
    """Start the router and return its handle; `port=0` / `http_port=0` bind free ports."""
    return await service_kit.start_service(SERVICE, settings, port=port, http_port=http_port, metrics=metrics)


async def serve(settings: RouterSettings | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    await service_kit.serve(SERVICE, settings)


if __name__ == "__main__":
    asyncio.run(serve())
