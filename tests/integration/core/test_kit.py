"""The service kit over real sockets and a real nats-server: a declared service
starts its parts in order, serves gRPC and HTTP with health, starts consumers
once NATS is up (even when it comes up late), and stops in the reverse order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmo.core.client import create_channel
from llmo.core.kit import Kit, ServiceSpec, start_service
from llmo.core.natsd import NatsServer
from llmo.core.settings import PlatformSettings
from llmo.protos.common.v1 import common_pb2

from .echo_service import SERVICE, EchoSettings, add_echo, stubs


class Recorder:
    def __init__(self, log: list[str], name: str) -> None:
        self.log = log
        self.name = name

    async def start(self) -> None:
        self.log.append(f"start {self.name}")

    async def stop(self) -> None:
        self.log.append(f"stop {self.name}")


def spec_with(log: list[str]) -> ServiceSpec[EchoSettings]:
    async def build(kit: Kit[EchoSettings]) -> None:
        store = await kit.storage(lambda: log.append("open storage") or "store",
                                  lambda s: log.append(f"close {s}"))
        kit.outbox_publisher()
        kit.consumer(Recorder(log, "consumer"))

        async def tick() -> None:
            log.append("task running")
            await asyncio.Event().wait()

        kit.task("tick", tick)
        kit.on_stop(_noting(log, "tasks closed"))
        kit.grpc(add_echo, None, SERVICE)

        async def hello(request: web.Request) -> web.Response:
            return web.json_response({"store": store})

        kit.http().router.add_get("/hello", hello)
        kit.expose(store=store)

    return ServiceSpec("cost", EchoSettings, build)


def _noting(log: list[str], line: str) -> Callable[[], asyncio.Future[None]]:
    async def note() -> None:
        log.append(line)

    return note  # type: ignore[return-value]


def settings_for(tmp_path: Path, nats_url: str) -> EchoSettings:
    return EchoSettings(metrics_port=-1, platform=PlatformSettings(data_dir=tmp_path / "data", nats_url=nats_url))


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_a_declared_service_serves_and_stops_in_order(tmp_path: Path, nats_server: NatsServer) -> None:
    log: list[str] = []
    running = await start_service(spec_with(log), settings_for(tmp_path, nats_server.url), port=0, http_port=0)
    try:
        assert running.store == "store"
        await until(lambda: "start consumer" in log, "consumer start")
        async with create_channel(f"127.0.0.1:{running.port}") as channel:
            echo, _ = stubs(channel)
            reply = await echo(common_pb2.Usage(output_tokens=1))
            assert reply.output_tokens == 2
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{running.http_port}"
            async with session.get(f"{base}/hello") as resp:
                assert resp.status == 200 and await resp.json() == {"store": "store"}
            async with session.get(f"{base}/readyz") as resp:
                assert resp.status == 200
    finally:
        await running.stop()
    assert log.index("open storage") < log.index("task running")
    stops = log[log.index("tasks closed"):]
    assert stops == ["tasks closed", "stop consumer", "close store"]


async def test_a_service_starts_without_nats_and_consumes_once_it_is_up(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "nats")
    log: list[str] = []
    # the server is not running yet: the service must start anyway
    running = await start_service(spec_with(log), settings_for(tmp_path, nats.url), port=0, http_port=-1)
    try:
        assert running.port > 0 and running.http_port is None
        assert "start consumer" not in log
        publisher = running.publisher
        assert publisher is not None
        await publisher.publish(_event())
        assert publisher.depth >= 1
        nats.start()
        await until(lambda: "start consumer" in log, "consumer start after NATS came up")
        await until(lambda: publisher.depth == 0, "outbox drained")
    finally:
        await running.stop()
        nats.stop()


def _event() -> common_pb2.Usage:
    from llmo.protos.events.v1 import events_pb2

    event = events_pb2.InferenceCompleted(event_id="kit-test-1", request_id="r1", model="m")
    return event  # type: ignore[return-value]
