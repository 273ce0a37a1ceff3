"""Run the cost service: gRPC CostService, NATS usage consumers, budget refresh, alerts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from llmo.core.events import EventBus
from llmo.core.logging import get_logger
from llmo.core.metrics import start_service_metrics
from llmo.core.outbox import Publisher
from llmo.core.server import GrpcServer, serve_until_signal
from llmo.cost.engine import CostEngine
from llmo.cost.ingest import INFERENCE, ROUTER, UsageConsumer
from llmo.cost.prices import load_catalog
from llmo.cost.servicer import CostServicer
from llmo.cost.settings import CostSettings
from llmo.cost.storage import CostStore
from llmo.protos.cost.v1 import cost_service_pb2_grpc

log = get_logger(__name__)

SERVICE_NAME = "llmo.cost.v1.CostService"


@dataclass
class RunningCost:
    settings: CostSettings
    engine: CostEngine
    server: GrpcServer
    port: int
    bus: EventBus | None = None
    consumers: list[UsageConsumer] = field(default_factory=list)
    publisher: Publisher | None = None

    async def stop(self) -> None:
        await self.server.stop()
        for consumer in self.consumers:
            await consumer.stop()
        await self.engine.stop()
        if self.publisher is not None:
            await self.publisher.stop()
        if self.bus is not None:
            await self.bus.close()
        await asyncio.to_thread(self.engine.store.close)


def _consumers(settings: CostSettings, bus: EventBus, engine: CostEngine) -> list[UsageConsumer]:
    return [
        UsageConsumer(
            bus,
            engine,
            source,
            f"{settings.consumer_name}-{suffix}",
            batch=settings.ingest_batch,
            ack_wait=settings.ack_wait_s,
            max_deliver=settings.max_deliver,
        )
        for source, suffix in ((INFERENCE, "inference"), (ROUTER, "router"))
    ]


async def start(settings: CostSettings, *, port: int | None = None, metrics: bool = True) -> RunningCost:
    """Start everything and return a handle; ``port=0`` binds a free port."""
    catalog = load_catalog(settings.price_files)
    store = await asyncio.to_thread(CostStore.open, settings.resolved_database_url())
    bus: EventBus | None = None
    publisher: Publisher | None = None
    if settings.consume_events:
        # serve gRPC whether or not NATS is up; alerts wait in the outbox, usage in JetStream
        bus = EventBus(settings.platform.nats_url, name="llmo-cost")
        publisher = await Publisher.for_service(settings, bus).start()
    engine = CostEngine(store, catalog, publisher, reservation_ttl_s=settings.reservation_ttl_s)
    await engine.start(refresh_s=settings.budget_refresh_s, alert_retry_s=settings.alert_retry_s)
    server = GrpcServer("cost", settings, port=port)
    server.add_service(cost_service_pb2_grpc.add_CostServiceServicer_to_server, CostServicer(engine), SERVICE_NAME)
    running = RunningCost(settings, engine, server, 0, bus, publisher=publisher)
    if bus is not None:
        running.consumers = _consumers(settings, bus, engine)
        for consumer in running.consumers:
            bus.when_connected(consumer.start)
        bus.connect_in_background(attempt_s=min(2.0, settings.nats_connect_timeout_s))
    running.port = await server.start()
    if metrics:
        start_service_metrics(settings)
    log.info(
        "cost service started",
        grpc_port=running.port,
        database=store.engine.url.render_as_string(hide_password=True),
        events=bus is not None,
    )
    return running


async def serve(settings: CostSettings | None = None) -> None:
    """Run until SIGTERM/SIGINT or cancellation, then drain."""
    await serve_until_signal("cost", settings or CostSettings(), start)


if __name__ == "__main__":
    asyncio.run(serve())
