"""The cost service, declared on the service kit: gRPC CostService, the NATS usage
consumers, budget refresh, and alerts through the outbox."""

from __future__ import annotations

import asyncio

from llmo.core import kit as service_kit
from llmo.core.kit import Kit, ServiceSpec
from llmo.cost.engine import CostEngine
from llmo.cost.ingest import INFERENCE, ROUTER, UsageConsumer
from llmo.cost.prices import load_catalog
from llmo.cost.servicer import CostServicer
from llmo.cost.settings import CostSettings
from llmo.cost.storage import CostStore
from llmo.protos.cost.v1 import cost_service_pb2_grpc

SERVICE_NAME = "llmo.cost.v1.CostService"


async def build(kit: Kit[CostSettings]) -> None:
    settings = kit.settings
    catalog = load_catalog(settings.price_files)
    store = await kit.storage(lambda: CostStore.open(settings.resolved_database_url()), CostStore.close)
    # gRPC serves whether or not NATS is up: alerts wait in the outbox, usage in JetStream
    publisher = None
    if settings.consume_events:
        kit.event_bus(connect_attempt_s=min(2.0, settings.nats_connect_timeout_s))
        publisher = kit.outbox_publisher()
    engine = CostEngine(store, catalog, publisher, reservation_ttl_s=settings.reservation_ttl_s)
    await engine.start(refresh_s=settings.budget_refresh_s, alert_retry_s=settings.alert_retry_s)
    kit.on_stop(engine.stop, after="consumers")
    if settings.consume_events:
        for source, suffix in ((INFERENCE, "inference"), (ROUTER, "router")):
            kit.consumer(UsageConsumer(
                kit.event_bus(), engine, source, f"{settings.consumer_name}-{suffix}",
                batch=settings.ingest_batch, ack_wait=settings.ack_wait_s, max_deliver=settings.max_deliver,
            ))
    kit.grpc(cost_service_pb2_grpc.add_CostServiceServicer_to_server, CostServicer(engine), SERVICE_NAME)
    kit.expose(engine=engine)


SERVICE = ServiceSpec("cost", CostSettings, build)
RunningCost = Kit[CostSettings]


async def start(settings: CostSettings, *, port: int | None = None, metrics: bool = True) -> RunningCost:
    """Start the cost service and return its handle; ``port=0`` binds a free port."""
    return await service_kit.start_service(SERVICE, settings, port=port, metrics=metrics)


async def serve(settings: CostSettings | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    await service_kit.serve(SERVICE, settings)


if __name__ == "__main__":
    asyncio.run(serve())
