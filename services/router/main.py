"""Run the router service: gRPC RouterService (50051), OpenAI-compatible HTTP (8080),
portfolio hot reload, NATS events and the evaluation-score consumer."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from llmo.core.events import EventBus
from llmo.core.logging import get_logger
from llmo.core.metrics import start_service_metrics
from llmo.core.outbox import Publisher
from llmo.core.server import GrpcServer, serve_until_signal
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
from llmo.router.learned.embed import Embedder
from llmo.router.lingua import SurprisalPruner, default_model_dir
from llmo.router.portfolio import PortfolioStore
from llmo.router.prompts import PromptRegistry
from llmo.router.servicer import RouterServicer
from llmo.router.settings import RouterSettings
from llmo.router.store import open_store

log = get_logger(__name__)

SERVICE_NAME = "llmo.router.v1.RouterService"


@dataclass
class RunningRouter:
    settings: RouterSettings
    gateway: Gateway
    server: GrpcServer
    port: int
    http_port: int | None
    portfolio: PortfolioStore
    engine: Any
    bus: EventBus | None = None
    budget: CostBudgetChecker | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    runner: web.AppRunner | None = None
    consumer: ScoreConsumer | None = None
    publisher: Publisher | None = None

    async def stop(self) -> None:
        await self.server.stop()
        if self.runner is not None:
            await self.runner.cleanup()
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.consumer is not None:
            await self.consumer.stop()
        await self.gateway.close()
        if self.budget is not None:
            await self.budget.close()
        if self.publisher is not None:
            await self.publisher.stop()
        if self.bus is not None:
            await self.bus.close()
        await asyncio.to_thread(self.engine.dispose)


def _pruner(settings: RouterSettings) -> SurprisalPruner | None:
    if settings.compression_model_dir.lower() == "none":
        return None
    directory = Path(settings.compression_model_dir) if settings.compression_model_dir else default_model_dir()
    return SurprisalPruner(directory) if directory is not None else None


async def start(
    settings: RouterSettings, *, port: int | None = None, http_port: int | None = None, metrics: bool = True
) -> RunningRouter:
    """Start everything and return a handle; `port=0` / `http_port=0` bind free ports."""
    store = PortfolioStore(ensure_portfolio(settings))
    engine = await asyncio.to_thread(open_store, settings.resolved_database_url())
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
    bus: EventBus | None = None
    publisher: Publisher | None = None
    if settings.events:
        # start-up and requests never wait on NATS: events go through the outbox
        bus = EventBus(settings.platform.nats_url, name="llmo-router")
        publisher = await Publisher.for_service(settings, bus).start()
    budget = CostBudgetChecker(settings.cost_target, settings.budget_timeout_s, settings.cost_api_key) if settings.cost_target else None
    gateway = Gateway(
        lambda: store.current,
        bandit=bandit,
        prompts=PromptRegistry(engine),
        experiments=experiments,
        learned=learned,
        cache=cache,
        budget=budget,
        events=NatsEventSink(publisher, lambda: store.current) if publisher is not None else None,
        encoder=encoder_of(embedder),
        hedge_after_s=settings.hedge_after_ms / 1000.0,
    )
    gateway.pruner = _pruner(settings)
    feedback = FeedbackRecorder(engine, bandit, experiments)
    consumer = None
    if bus is not None:
        consumer = ScoreConsumer(bus, feedback, f"{settings.consumer_name}-scores")
        bus.when_connected(consumer.start)
        bus.connect_in_background()
    server = GrpcServer("router", settings, port=port)
    server.add_service(router_service_pb2_grpc.add_RouterServiceServicer_to_server, RouterServicer(gateway, feedback), SERVICE_NAME)
    bound = await server.start()
    runner = None
    bound_http: int | None = None
    want_http = settings.resolved_http_port() if http_port is None else http_port
    if want_http is not None and want_http >= 0:
        runner = web.AppRunner(OpenAIFront(gateway, settings.platform, max_body_bytes=settings.max_body_bytes).app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, settings.host, want_http)
        await site.start()
        sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr,attr-defined]
        bound_http = sockets[0].getsockname()[1] if sockets else want_http
    tasks = [asyncio.create_task(store.watch(settings.portfolio_reload_s), name="portfolio-watch")]
    if metrics:
        start_service_metrics(settings)
    log.info(
        "router service started",
        grpc_port=bound,
        http_port=bound_http,
        portfolio=str(store.path),
        learned=bool(learned),
        budget=bool(budget),
        events=bus is not None,
    )
    return RunningRouter(settings, gateway, server, bound, bound_http, store, engine, bus, budget, tasks, runner, consumer, publisher)


async def serve(settings: RouterSettings | None = None) -> None:
    """Run until SIGTERM/SIGINT or cancellation, then drain."""
    await serve_until_signal("router", settings or RouterSettings(), start)


if __name__ == "__main__":
    asyncio.run(serve())
