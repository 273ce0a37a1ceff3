"""The gRPC server every service runs.

`GrpcServer` wires grpc.aio with `grpc.health.v1`, reflection and one
interceptor that, for every call: authenticates the API key (tenant), binds
request id / tenant / trace ids / deadline to the context and the logs,
records Prometheus metrics, and maps errors to a status with
`google.rpc.ErrorInfo` (never a stack trace to the client). `stop()` drains:
health flips to NOT_SERVING, new calls are refused, in-flight calls get
`drain_seconds` to finish.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmo.core import context as ctx
from llmo.core import tracing
from llmo.core.auth import resolve_caller
from llmo.core.errors import STATUS_DETAILS_KEY, ServiceError
from llmo.core.logging import configure_logging, get_logger
from llmo.core.metrics import GRPC_IN_FLIGHT, GRPC_LATENCY, GRPC_REQUESTS
from llmo.core.settings import PlatformSettings, ServiceSettings

log = get_logger(__name__)

# Calls that must work without an API key (probes, grpcurl discovery).
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class LlmoServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, domain: str, platform: PlatformSettings) -> None:
        self.domain = domain
        self.platform = platform
        self.in_flight = GRPC_IN_FLIGHT.labels(domain)
        # wrapped handlers are built once per method, not on every call
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    # labelled metric children, looked up once per method (labels() costs more than the update)
    @functools.lru_cache(maxsize=1024)  # noqa: B019 - one interceptor per server, for its lifetime
    def requests(self, method: str, code: grpc.StatusCode) -> Any:
        return GRPC_REQUESTS.labels(self.domain, method, code.name)

    @functools.lru_cache(maxsize=1024)  # noqa: B019
    def latency(self, method: str) -> Any:
        return GRPC_LATENCY.labels(self.domain, method)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if method.startswith(PUBLIC_PREFIXES):
            return handler
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(handler, method))
            self._wrapped[method] = cached
        return cached[1]

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        kwargs = {
            "request_deserializer": _tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, method), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary, method), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._stream(handler.unary_stream, method), **kwargs)
        return grpc.stream_stream_rpc_method_handler(self._stream(handler.stream_stream, method), **kwargs)

    def _unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._call(method, context):
                _check_decoded(request)
                return await behavior(request, context)

        return call

    def _stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._call(method, context):
                _check_decoded(request)
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:
                    await result

        return call

    def _call(self, method: str, context: grpc.aio.ServicerContext) -> _CallScope:
        return _CallScope(self, method, context)


class _Undecodable:
    """A request the protobuf runtime refused (invalid UTF-8 in a string field, truncated bytes)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Decode errors become a value the call then rejects with INVALID_ARGUMENT and ErrorInfo;
    raised inside grpc's deserializer they would reach the client as UNKNOWN with no detail."""
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            return _Undecodable(str(error)[:200])

    return decode


def _check_decoded(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PROTOBUF",
                           "the request is not a valid protobuf message (string fields must be UTF-8)",
                           {"detail": request.error})


class _CallScope:
    """Everything the interceptor does around one call, as an async context manager."""

    def __init__(self, owner: LlmoServerInterceptor, method: str, context: grpc.aio.ServicerContext) -> None:
        self.owner = owner
        self.method = method
        self.context = context
        self.code = grpc.StatusCode.OK
        self._bound: Any = None

    async def __aenter__(self) -> None:
        self.started = time.perf_counter()
        self.owner.in_flight.inc()
        metadata = {k: v for k, v in self.context.invocation_metadata() or () if isinstance(v, str)}
        self.span = tracing.rpc_span(self.method, metadata.get("traceparent"))
        trace = self.span.trace
        remaining = self.context.time_remaining()
        platform = self.owner.platform
        try:
            caller = resolve_caller(metadata, platform.api_keys, platform.admin_tenants,
                                    default_tenant=platform.default_tenant)
        except ServiceError as error:
            self._bound = ctx.bind(request_id=ctx.new_request_id(), trace=trace, timeout=remaining, method=self.method)
            self._bound.__enter__()
            try:
                await self._finish_with(error)  # aborts the call: raises
            finally:
                self._cleanup()
        extra = {"client_request_id": caller.client_request_id} if caller.client_request_id else {}
        if caller.key_tenant != caller.tenant:
            extra["on_behalf_of"] = caller.key_tenant
        self.span.set_attribute("llmo.tenant", caller.tenant)
        self.span.set_attribute("llmo.request_id", caller.request_id)
        # one binding for the whole call (each bind costs a context manager and a structlog merge)
        self._bound = ctx.bind(request_id=caller.request_id, trace=trace, timeout=remaining, method=self.method,
                               tenant=caller.tenant, admin=caller.admin, **extra)
        self._bound.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        try:
            if exc is None:
                return False
            if isinstance(exc, ServiceError):
                await self._finish_with(exc)
            if isinstance(exc, asyncio.CancelledError):
                self.code = grpc.StatusCode.CANCELLED
                return False
            if isinstance(exc, grpc.aio.AbortError) or _is_abort(exc):
                self.code = _context_code(self.context) or grpc.StatusCode.UNKNOWN
                return False
            log.exception("unhandled error", method=self.method)
            request_id = ctx.current_request_id()
            await self._finish_with(
                ServiceError(
                    grpc.StatusCode.INTERNAL,
                    "INTERNAL",
                    f"internal error (request id {request_id})",
                    {"request_id": request_id or ""},
                )
            )
            return False
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        self._record()
        self.span.set_grpc_status(self.code)
        self.span.end()
        self._bound.__exit__(None, None, None)

    async def _finish_with(self, error: ServiceError) -> None:
        self.code = error.code
        status = error.to_status(f"llmo.{self.owner.domain}")
        level = "warning" if error.code == grpc.StatusCode.INTERNAL else "info"
        getattr(log, level)("call failed", code=error.code.name, reason=error.reason, error=error.message)
        await self.context.abort(
            error.code,
            error.message,
            trailing_metadata=((STATUS_DETAILS_KEY, status.SerializeToString()),),
        )

    def _record(self) -> None:
        elapsed = time.perf_counter() - self.started
        owner = self.owner
        owner.in_flight.dec()
        owner.requests(self.method, self.code).inc()
        owner.latency(self.method).observe(elapsed)
        log.debug("call", code=self.code.name, duration_ms=round(elapsed * 1000, 3))


def _is_abort(exc: BaseException) -> bool:
    return type(exc).__name__ == "AbortError"


def _context_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode | None:
    code = getattr(context, "code", None)
    value = code() if callable(code) else None
    return value if isinstance(value, grpc.StatusCode) else None


class GrpcServer:
    """A grpc.aio server with health, reflection, the LLMO interceptor and drain."""

    def __init__(
        self,
        domain: str,
        settings: ServiceSettings,
        *,
        port: int | None = None,
        extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.domain = domain
        self.settings = settings
        self._port = settings.resolved_grpc_port() if port is None else port
        self.server = grpc.aio.server(
            interceptors=[LlmoServerInterceptor(domain, settings.platform), *extra_interceptors],
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = health.aio.HealthServicer()
        self.service_names: list[str] = []
        self.bound_port = 0

    def add_service(self, add_to_server: Callable[[Any, grpc.aio.Server], None], servicer: Any, full_name: str) -> None:
        """Register a servicer, e.g. `add_service(pb2_grpc.add_CostServiceServicer_to_server, s, "llmo.cost.v1.CostService")`."""
        add_to_server(servicer, self.server)
        self.service_names.append(full_name)

    async def start(self) -> int:
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        address = f"{self.settings.host}:{self._port}"
        self.bound_port = self.server.add_insecure_port(address)
        if self.bound_port == 0:
            raise OSError(f"cannot bind gRPC port {address}")
        await self.server.start()
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("grpc server started", address=f"{self.settings.host}:{self.bound_port}", services=self.service_names)
        return self.bound_port

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, refuse new calls, give in-flight calls `grace` seconds."""
        grace = self.settings.platform.drain_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        log.info("draining", grace_seconds=grace)
        await self.server.stop(grace)
        log.info("grpc server stopped")


class RunningService(Protocol):
    async def stop(self) -> None: ...


SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


async def serve_until_signal(
    service: str, settings: SettingsT, start: Callable[[SettingsT], Awaitable[RunningService]]
) -> None:
    """What every service's `serve()` does: configure logging, start, run until
    SIGTERM/SIGINT (or cancellation), then stop (drain)."""
    configure_logging(service, env=settings.platform.env, level=settings.platform.log_level)
    tracing.configure_tracing(service, settings.platform.otel_endpoint)
    try:
        running = await start(settings)
        try:
            await wait_for_shutdown_signal()
        finally:
            await running.stop()
    finally:
        await asyncio.to_thread(tracing.shutdown_tracing)


async def wait_for_shutdown_signal() -> None:
    """Return on SIGTERM or SIGINT (or when the surrounding task is cancelled)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await stop.wait()
        log.info("shutdown signal received")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
