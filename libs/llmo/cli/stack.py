"""The embedded stack behind `llmo up` and `llmo demo`.

A real nats-server with JetStream in the data directory, then each implemented
service as its own supervised process (`llmo serve <name>`), health-checked
over `grpc.health.v1`. State (ports, pids) is written to
`<data_dir>/stack.json` for `llmo status`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmo.core.logging import get_logger
from llmo.core.natsd import NatsServer, free_port
from llmo.core.settings import (
    DEFAULT_GRPC_PORTS,
    DEFAULT_HTTP_PORTS,
    DEFAULT_METRICS_PORTS,
    SERVICES,
    parse_admin_tenants,
    parse_api_keys,
    service_env_prefix,
)

log = get_logger(__name__)

STATE_FILE = "stack.json"
MAX_RESTARTS = 5
# The tenants of the service keys `llmo up` mints when API keys are on, for the services that
# call another service for an end tenant (admin tenants, acting through `x-llmo-tenant`).
ROUTER_SERVICE_TENANT = "llmo-router"
RETRIEVAL_SERVICE_TENANT = "llmo-retrieval"
RETRIEVAL_KEY_ENV = "LLMO_RETRIEVAL_GENERATOR_API_KEY"
EVALUATION_SERVICE_TENANT = "llmo-evaluation"
EVALUATION_KEY_ENV = "LLMO_EVALUATION_JUDGE_API_KEY"
VISIBILITY_SERVICE_TENANT = "llmo-visibility"
VISIBILITY_KEY_ENV = "LLMO_VISIBILITY_ENGINE_API_KEY"


def implemented_services() -> list[str]:
    """Services whose package has a `main` module; the others are absent, not faked."""
    found = []
    for name in SERVICES:
        try:
            if importlib.util.find_spec(f"llmo.{name}.main") is not None:
                found.append(name)
        except ModuleNotFoundError:
            continue
    return found


@dataclass
class ServiceEndpoint:
    name: str
    grpc: str
    metrics: str
    http: str = ""
    pid: int = 0
    restarts: int = 0
    log_file: str = ""


@dataclass
class StackState:
    data_dir: str
    nats_url: str
    services: dict[str, ServiceEndpoint] = field(default_factory=dict)

    def endpoints(self) -> dict[str, str]:
        """What a service demo receives: name -> host:port, `<name>_http` -> base URL."""
        out: dict[str, str] = {"nats": self.nats_url}
        for name, svc in self.services.items():
            out[name] = svc.grpc
            if svc.http:
                out[f"{name}_http"] = svc.http
        return out

    def save(self) -> None:
        path = Path(self.data_dir) / STATE_FILE
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, data_dir: Path) -> StackState | None:
        path = data_dir / STATE_FILE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        services = {k: ServiceEndpoint(**v) for k, v in raw.pop("services").items()}
        return cls(services=services, **raw)


async def check_health(target: str, service: str = "", timeout: float = 1.0) -> str:
    """SERVING / NOT_SERVING / UNREACHABLE for one gRPC endpoint."""
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.aio.AioRpcError:
        return "UNREACHABLE"


class Stack:
    def __init__(
        self,
        data_dir: Path,
        *,
        services: list[str] | None = None,
        random_ports: bool = False,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.services = services if services is not None else implemented_services()
        self.random_ports = random_ports
        self.host = host
        self.extra_env = env or {}
        self.shared_env, self.service_env = service_keys({**os.environ, **self.extra_env})
        self.nats = NatsServer(self.data_dir / "nats", port=0 if random_ports else _port_or_free(4222, host), host=host)
        self.state = StackState(data_dir=str(self.data_dir), nats_url=self.nats.url)
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None

    def _port(self, default: int) -> int:
        return free_port(self.host) if self.random_ports else _port_or_free(default, self.host)

    async def start(self, health_timeout: float = 180.0) -> StackState:
        """Start everything; on any failure stop what was started (no orphan processes)."""
        unknown = sorted(set(self.services) - set(implemented_services()))
        if unknown:
            raise ValueError(f"not implemented (yet): {', '.join(unknown)}")
        try:
            return await self._start(health_timeout)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, health_timeout: float) -> StackState:
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.nats.start)
        for name in self.services:
            endpoint = ServiceEndpoint(
                name=name,
                grpc=f"{self.host}:{self._port(DEFAULT_GRPC_PORTS[name])}",
                metrics=f"http://{self.host}:{self._port(DEFAULT_METRICS_PORTS[name])}/metrics",
                log_file=str(self.data_dir / "logs" / f"{name}.log"),
            )
            if name in DEFAULT_HTTP_PORTS:
                endpoint.http = f"http://{self.host}:{self._port(DEFAULT_HTTP_PORTS[name])}"
            self.state.services[name] = endpoint
        for name in self.services:
            self._spawn(name)
        self.state.save()
        await self._wait_healthy(health_timeout)
        self._supervisor = asyncio.create_task(self._supervise())
        return self.state

    def _env(self, name: str) -> dict[str, str]:
        endpoint = self.state.services[name]
        prefix = service_env_prefix(name)
        env = {
            **os.environ,
            **self.extra_env,
            "LLMO_DATA_DIR": str(self.data_dir),
            "LLMO_NATS_URL": self.nats.url,
            f"{prefix}HOST": self.host,
            f"{prefix}GRPC_PORT": endpoint.grpc.rsplit(":", 1)[1],
            f"{prefix}METRICS_PORT": endpoint.metrics.rsplit(":", 1)[1].split("/")[0],
            **self.shared_env,
            **self.service_env.get(name, {}),
        }
        if endpoint.http:
            env[f"{prefix}HTTP_PORT"] = endpoint.http.rsplit(":", 1)[1]
        # Services find each other through the same variables an SRE would set.
        for other, other_endpoint in self.state.services.items():
            env.setdefault(f"LLMO_{other.upper()}_ADDRESS", other_endpoint.grpc)
            if other_endpoint.http:
                env.setdefault(f"LLMO_{other.upper()}_HTTP_URL", other_endpoint.http)
        if "evaluation" in self.state.services:
            # The embedded stack closes the quality loop: completed events carry their text, the
            # evaluation service scores them and the router's bandits learn from the scores.
            env.setdefault("LLMO_ROUTER_EVENT_CONTENT_SAMPLE", "1")
            env.setdefault("LLMO_INFERENCE_EVENT_CONTENT_SAMPLE", "1")
        return env

    def _spawn(self, name: str) -> None:
        endpoint = self.state.services[name]
        log_file = open(endpoint.log_file, "ab")
        self._logs[name] = log_file
        process = subprocess.Popen(
            [sys.executable, "-m", "llmo.cli.main", "serve", name],
            env=self._env(name),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops children in order
        )
        self._processes[name] = process
        endpoint.pid = process.pid

    async def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.services)
        while pending:
            for name in sorted(pending):
                process = self._processes[name]
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with code {process.returncode} during start-up; "
                        f"see {self.state.services[name].log_file}"
                    )
                if await check_health(self.state.services[name].grpc) == "SERVING":
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not healthy after {timeout:.0f}s: {', '.join(sorted(pending))}")
            if pending:
                await asyncio.sleep(0.25)

    async def _supervise(self) -> None:
        """Restart a service that dies, with backoff, up to MAX_RESTARTS times."""
        while not self._stopping:
            await asyncio.sleep(1.0)
            for name, process in list(self._processes.items()):
                if self._stopping or process.poll() is None:
                    continue
                endpoint = self.state.services[name]
                if endpoint.restarts >= MAX_RESTARTS:
                    continue
                endpoint.restarts += 1
                log.warning("service exited; restarting", service=name, code=process.returncode, restarts=endpoint.restarts)
                await asyncio.sleep(min(2**endpoint.restarts * 0.25, 10))
                self._logs[name].close()
                self._spawn(name)
                self.state.save()

    async def stop(self, timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM every service (they drain), wait, then stop nats-server."""
        self._stopping = True
        if self._supervisor:
            self._supervisor.cancel()
        for process in self._processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + timeout
        for name, process in self._processes.items():
            try:
                codes[name] = await asyncio.to_thread(process.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = await asyncio.to_thread(process.wait)
        for handle in self._logs.values():
            handle.close()
        await asyncio.to_thread(self.nats.stop)
        state_file = self.data_dir / STATE_FILE
        if state_file.exists():
            state_file.unlink()
        return codes

    async def __aenter__(self) -> Stack:
        await self.start()
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.stop()


def service_keys(env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(variables for every service, extra variables per service) that give each service calling
    another for an end tenant a key of its own, when API keys are on (`LLMO_API_KEYS`).

    - the router (admin tenant `llmo-router`), unless `LLMO_ROUTER_INFERENCE_API_KEY` is set: it
      presents the key to inference (which then charges the end tenant the router names) and,
      unless one is set, to cost;
    - retrieval (admin tenant `llmo-retrieval`), unless `LLMO_RETRIEVAL_GENERATOR_API_KEY` is set:
      it presents the key to the router, its generator, which charges the searching tenant;
    - evaluation (admin tenant `llmo-evaluation`), unless `LLMO_EVALUATION_JUDGE_API_KEY` is set:
      it presents the key to the router, its judge and target, which charge the evaluated tenant;
    - visibility (admin tenant `llmo-visibility`), unless `LLMO_VISIBILITY_ENGINE_API_KEY` is set:
      it presents the key to the router, its answer engines, which charge the tenant who ran the
      share-of-voice run.

    Every service accepts every minted key."""
    keys = parse_api_keys(env.get("LLMO_API_KEYS"))
    if not keys:
        return {}, {}
    admins = set(parse_admin_tenants(env.get("LLMO_ADMIN_TENANTS")))
    per_service: dict[str, dict[str, str]] = {}

    def mint(tenant: str) -> str:
        key = f"llmo-svc-{secrets.token_urlsafe(24)}"
        keys[key] = tenant
        admins.add(tenant)
        return key

    if not env.get("LLMO_ROUTER_INFERENCE_API_KEY"):
        key = mint(ROUTER_SERVICE_TENANT)
        per_service["router"] = {"LLMO_ROUTER_INFERENCE_API_KEY": key}
        if not env.get("LLMO_ROUTER_COST_API_KEY"):
            per_service["router"]["LLMO_ROUTER_COST_API_KEY"] = key
    if not env.get(RETRIEVAL_KEY_ENV):
        per_service["retrieval"] = {RETRIEVAL_KEY_ENV: mint(RETRIEVAL_SERVICE_TENANT)}
    if not env.get(EVALUATION_KEY_ENV):
        per_service["evaluation"] = {EVALUATION_KEY_ENV: mint(EVALUATION_SERVICE_TENANT)}
    if not env.get(VISIBILITY_KEY_ENV):
        per_service["visibility"] = {VISIBILITY_KEY_ENV: mint(VISIBILITY_SERVICE_TENANT)}
    if not per_service:
        return {}, {}
    return {"LLMO_API_KEYS": json.dumps(keys), "LLMO_ADMIN_TENANTS": ",".join(sorted(admins))}, per_service


def _port_or_free(preferred: int, host: str) -> int:
    """The conventional port when it is free, else any free one (the machine may run its own NATS)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, preferred))
        except OSError:
            return free_port(host)
    return preferred
