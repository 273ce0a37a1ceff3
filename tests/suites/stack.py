"""The real stack the suites run against: nats-server, inference (tiny demo model), cost and
router, started once per test module on free ports, on an event loop of their own in a
background thread so the tests (and hypothesis) can drive them with blocking clients."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from aiohttp import web

from llmo.core.natsd import NatsServer
from llmo.core.settings import PlatformSettings

T = TypeVar("T")

# k1 / k2 are the two ordinary tenants the suites attack with and for; router and finops
# are admin (service) tenants; probe tenants are written only by the suites' own
# known-good checks so their totals can be compared to the micro-dollar.
KEYS = {
    "k1": "tenantA",
    "k2": "tenantB",
    "k-router": "router",
    "k-finops": "finops",
    "k-ledger": "ledger",
    "k-probe": "probe",
}
ADMIN_TENANTS = frozenset({"router", "finops"})
UPSTREAM_KEY_ENV = "LLMO_SUITE_UPSTREAM_KEY"
CALL_TIMEOUT_S = 120.0


def platform(nats_url: str, data_dir: Path) -> PlatformSettings:
    return PlatformSettings(nats_url=nats_url, data_dir=data_dir, drain_seconds=0.5, api_keys=KEYS,
                            admin_tenants=ADMIN_TENANTS)


class LoopThread:
    """An asyncio loop running forever in a daemon thread; `run` blocks on a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="suite-stack", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT_S) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


@dataclass
class Endpoint:
    """One started service: where it listens and how to stop it."""

    grpc_address: str
    http_port: int | None
    http_app: web.Application | None
    stop: Callable[[], Awaitable[None]]
    handle: Any = None


@dataclass
class Stack:
    loop: LoopThread
    nats: NatsServer
    data_dir: Path
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def channel(self, service: str) -> grpc.Channel:
        if service not in self.channels:
            self.channels[service] = grpc.insecure_channel(self.endpoints[service].grpc_address, options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ])
        return self.channels[service]

    def stop(self) -> None:
        for channel in self.channels.values():
            channel.close()
        for endpoint in reversed(list(self.endpoints.values())):
            try:
                self.loop.run(endpoint.stop(), timeout=60)
            except Exception:  # one service failing to stop must not leak the others
                pass
        self.loop.close()
        self.nats.stop()


def start_stack(data_dir: Path, starters: list[tuple[str, Callable[[Stack], Awaitable[Endpoint]]]]) -> Stack:
    """Start nats-server, then each service in order (later ones may use earlier endpoints)."""
    os.environ.setdefault(UPSTREAM_KEY_ENV, "k-router")
    nats = NatsServer(data_dir / "nats")
    nats.start()
    stack = Stack(LoopThread(), nats, data_dir)
    try:
        for name, starter in starters:
            stack.endpoints[name] = stack.loop.run(starter(stack), timeout=300)
    except BaseException:
        stack.stop()
        raise
    return stack
