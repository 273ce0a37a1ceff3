"""Run the cost service: gRPC CostService, NATS usage consumers, budget refresh, alerts."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from llmo.core.events import EventBus
from llmo.core.logging import get_logger
from llmo.core.metrics import start_service_metrics
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
    connecting: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        await self.server.stop()
        if self.connecting is not None:
            self.connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.connecting
        for consumer in self.consumers:
            await consumer.stop()
        await self.engine.stop()
        if self.bus is not None:
            await self.bus.close()
        await asyncio.to_thread(self.engine.store.close)


async def _start_consumers(running: RunningCost, bus: EventBus) -> None:
    settings = running.settings
    for source, suffix in ((INFERENCE, "inference"), (ROUTER, "router")):
        consumer = UsageConsumer(
            bus,
            running.engine,
            source,
            f"{settings.consumer_name}-{suffix}",
            batch=settings.ingest_batch,
            ack_wait=settings.ack_wait_s,
            max_deliver=settings.max_deliver,
        )
        await consumer.start()
        running.consumers.append(consumer)


async def _connect(url: str, timeout: float) -> EventBus:
    # the bus reconnects forever once connected; a first connection gets a deadline
    return await asyncio.wait_for(EventBus(url, name="llmo-cost").connect(timeout=min(2.0, timeout)), timeout)


async def _connect_later(running: RunningCost, retry_s: float = 1.0) -> None:
    """NATS was unreachable at start-up: keep serving gRPC, connect and consume once it is up."""
    url = running.settings.platform.nats_url
    while True:
        await asyncio.sleep(retry_s)
        try:
            bus = await _connect(url, running.settings.nats_connect_timeout_s)
        except Exception as error:
            log.warning("NATS still unreachable; usage events wait in JetStream", url=url, error=repr(error))
            continue
        running.bus = bus
        running.engine.bus = bus
        await _start_consumers(running, bus)
        await running.engine.publish_pending_alerts()
        log.info("connected to NATS; consuming usage events", url=url)
        return


async def start(settings: CostSettings, *, port: int | None = None, metrics: bool = True) -> RunningCost:
    """Start everything and return a handle; ``port=0`` binds a free port."""
    catalog = load_catalog(settings.price_files)
    store = await asyncio.to_thread(CostStore.open, settings.resolved_database_url())
    bus: EventBus | None = None
    if settings.consume_events:
        try:
            bus = await _connect(settings.platform.nats_url, settings.nats_connect_timeout_s)
        except Exception as error:
            log.warning("NATS unreachable at start-up; retrying in the background", url=settings.platform.nats_url, error=repr(error))
    engine = CostEngine(store, catalog, bus, reservation_ttl_s=settings.reservation_ttl_s)
    await engine.start(refresh_s=settings.budget_refresh_s, alert_retry_s=settings.alert_retry_s)
    server = GrpcServer("cost", settings, port=port)
    server.add_service(cost_service_pb2_grpc.add_CostServiceServicer_to_server, CostServicer(engine), SERVICE_NAME)
    running = RunningCost(settings, engine, server, 0, bus)
    if bus is not None:
        await _start_consumers(running, bus)
    elif settings.consume_events:
        running.connecting = asyncio.create_task(_connect_later(running), name="cost:nats-connect")
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
