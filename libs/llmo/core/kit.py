"""The service kit: a service is a declaration, the kit owns its lifecycle.

A service module defines one `ServiceSpec` whose `build(kit)` declares what the
service has — storage, an event bus and its durable publisher, consumers,
background tasks, gRPC servicers, an HTTP app — and returns nothing. The kit
then starts the parts in one order and stops them in the reverse one:

    start: storage (and migrations, opened in build) -> event bus (connects in the
           background; consumers start once it is up) -> background tasks -> gRPC
           -> HTTP -> metrics -> health SERVING
    stop:  health NOT_SERVING -> drain gRPC and HTTP -> cancel tasks -> stop
           consumers -> flush the outbox and close the bus -> close storage

`kit.expose(name=obj)` makes a part reachable on the running handle
(`running.gateway`), for the CLI, the demo and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from aiohttp import web

from llmo.core.events import EventBus
from llmo.core.http_edge import DEFAULT_MAX_BODY_BYTES, PUBLIC_PATHS, edge_app, start_site
from llmo.core.logging import get_logger
from llmo.core.metrics import start_service_metrics
from llmo.core.outbox import Publisher
from llmo.core.server import GrpcServer, serve_until_signal
from llmo.core.settings import DEFAULT_HTTP_PORTS, ServiceSettings

log = get_logger(__name__)

S = TypeVar("S", bound=ServiceSettings)
T = TypeVar("T")


class Startable(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class ServiceSpec(Generic[S]):
    """What a service is: its name, settings class and the function that declares its parts."""

    name: str
    settings: type[S]
    build: Callable[[Kit[S]], Awaitable[None]]


@dataclass
class _GrpcBinding:
    add_to_server: Callable[[Any, Any], None]
    servicer: Any
    full_name: str


class Kit(Generic[S]):
    """The declaration surface `build()` uses; also the running service's handle."""

    def __init__(self, spec: ServiceSpec[S], settings: S, *, grpc_port: int | None = None,
                 http_port: int | None = None, metrics: bool = True) -> None:
        self.spec = spec
        self.settings = settings
        self.name = spec.name
        self._grpc_port = grpc_port
        self._http_port = http_port
        self._metrics = metrics
        self._grpc: list[_GrpcBinding] = []
        self._http: web.Application | None = None
        self._bus: EventBus | None = None
        self._connect_attempt_s = 2.0
        self._publisher: Publisher | None = None
        self._consumers: list[Startable] = []
        self._task_factories: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: dict[str, list[Callable[[], Awaitable[None]]]] = {"tasks": [], "consumers": [], "storage": []}
        self._parts: dict[str, Any] = {}
        self.server: GrpcServer | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.http_port: int | None = None
        self.ready = False

    # --- declarations -------------------------------------------------------------------------

    async def storage(self, open_: Callable[[], T], close: Callable[[T], None]) -> T:
        """Open a store now (off the event loop: engines and migrations block); closed last."""
        store = await asyncio.to_thread(open_)
        self._closers["storage"].append(lambda: asyncio.to_thread(close, store))
        return store

    def event_bus(self, *, connect_attempt_s: float = 2.0) -> EventBus:
        """Declare (once) and return the service's NATS connection; it connects in the background, so a service starts without NATS."""
        if self._bus is None:
            self._bus = EventBus(self.settings.platform.nats_url, name=f"llmo-{self.name}")
            self._connect_attempt_s = connect_attempt_s
        return self._bus

    def outbox_publisher(self) -> Publisher:
        """Declare (once) and return the durable publisher (outbox) every event of this service goes through."""
        if self._publisher is None:
            self._publisher = Publisher.for_service(self.settings, self.event_bus())
        return self._publisher

    def consumer(self, consumer: Startable) -> None:
        """Started once NATS is connected (retried until it starts), stopped before the bus closes."""
        self._consumers.append(consumer)

    def task(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """A background task, started after the bus and cancelled when the service stops."""
        self._task_factories.append((name, run))

    def on_stop(self, close: Callable[[], Awaitable[None]], *, after: str = "tasks") -> None:
        """Run `close` on stop, after the named phase: `tasks`, `consumers` or `storage` (last)."""
        self._closers[after].append(close)

    def grpc(self, add_to_server: Callable[[Any, Any], None], servicer: Any, full_name: str) -> None:
        self._grpc.append(_GrpcBinding(add_to_server, servicer, full_name))

    def http(self, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
             public_paths: Collection[str] = PUBLIC_PATHS) -> web.Application:
        """The service's HTTP app behind the shared edge, with `/healthz` and `/readyz`; add routes to it.
        `public_paths` need no API key."""
        if self._http is None:
            self._http = edge_app(self.name, self.settings.platform, max_body_bytes=max_body_bytes,
                                  ready=lambda: self.ready, public_paths=public_paths)
        return self._http

    @property
    def http_app(self) -> web.Application | None:
        return self._http

    def expose(self, **parts: Any) -> None:
        self._parts.update(parts)

    def __getattr__(self, name: str) -> Any:
        parts = self.__dict__.get("_parts", {})
        if name in parts:
            return parts[name]
        raise AttributeError(f"{type(self).__name__} of {self.__dict__.get('name', '?')!r} has no part {name!r}")

    @property
    def publisher(self) -> Publisher | None:
        return self._publisher

    @property
    def bus(self) -> EventBus | None:
        return self._bus

    @property
    def consumers(self) -> list[Startable]:
        return list(self._consumers)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> Kit[S]:
        try:
            await self.spec.build(self)
            if self._bus is not None:
                for consumer in self._consumers:
                    self._bus.when_connected(consumer.start)
                self._bus.connect_in_background(attempt_s=self._connect_attempt_s)
            if self._publisher is not None:
                await self._publisher.start()
            self._tasks = [asyncio.create_task(run(), name=f"{self.name}:{name}") for name, run in self._task_factories]
            if self._grpc:
                self.server = GrpcServer(self.name, self.settings, port=self._grpc_port)
                for binding in self._grpc:
                    self.server.add_service(binding.add_to_server, binding.servicer, binding.full_name)
                self.port = await self.server.start()
            if self._http is not None:
                wanted = self._wanted_http_port()
                if wanted is not None:
                    self._runner, self.http_port = await start_site(self._http, self.settings.host, wanted)
            if self._metrics:
                start_service_metrics(self.settings)
        except BaseException:
            await self.stop()
            raise
        self.ready = True
        log.info(f"{self.name} service started", grpc_port=self.port or None, http_port=self.http_port,
                 events=self._bus is not None)
        return self

    def _wanted_http_port(self) -> int | None:
        """The HTTP port to bind: the start argument, else the service's `http_port` setting (-1: none)."""
        if self._http_port is not None:
            return self._http_port if self._http_port >= 0 else None
        configured = int(getattr(self.settings, "http_port", 0))
        if configured < 0:
            return None
        return configured or DEFAULT_HTTP_PORTS.get(self.name, 0)

    async def stop(self) -> None:
        self.ready = False
        if self.server is not None:
            await self.server.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._close("tasks")
        for consumer in self._consumers:
            await _quietly(consumer.stop, "consumer")
        await self._close("consumers")
        if self._publisher is not None:
            await _quietly(self._publisher.stop, "outbox")
        if self._bus is not None:
            await _quietly(self._bus.close, "event bus")
        await self._close("storage")
        log.info(f"{self.name} service stopped")

    async def _close(self, phase: str) -> None:
        closers, self._closers[phase] = self._closers[phase], []
        for close in reversed(closers):
            await _quietly(close, phase)


async def _quietly(close: Callable[[], Awaitable[None]], what: str) -> None:
    """A failing close is logged and the stop goes on: the parts after it must still close."""
    try:
        await close()
    except Exception:
        log.exception("stop step failed", step=what)


async def start_service(spec: ServiceSpec[S], settings: S | None = None, *, port: int | None = None,
                        http_port: int | None = None, metrics: bool = True) -> Kit[S]:
    """Build and start a service; `port=0` / `http_port=0` bind free ports, `http_port=-1` turns HTTP off."""
    kit = Kit(spec, settings if settings is not None else spec.settings(), grpc_port=port, http_port=http_port,
              metrics=metrics)
    return await kit.start()


async def serve(spec: ServiceSpec[S], settings: S | None = None) -> None:
    """What `llmo serve <name>` runs: logging and tracing set up, start, run until SIGTERM/SIGINT, drain, stop."""
    settings = settings if settings is not None else spec.settings()
    await serve_until_signal(spec.name, settings, lambda s: start_service(spec, s))
