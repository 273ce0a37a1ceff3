"""OpenTelemetry spans for gRPC calls, HTTP requests and consumed events.

`configure_tracing(service, endpoint)` (called by `serve_until_signal` with
`LLMO_OTEL_ENDPOINT`) installs an SDK tracer provider that exports over
OTLP/gRPC. Without an endpoint nothing of the SDK is imported or installed:
`start_span` only mints the `TraceContext` the call binds for its logs, as it
did before tracing existed.

A span is started from the incoming W3C `traceparent` as its remote parent,
and its own ids become the `TraceContext` bound into `llmo.core.context`, so
the `trace_id` / `span_id` of a log line are the ids of the exported span, and
what a call sends downstream (`llmo.core.client.outgoing_metadata`, event
headers) names that span as the parent.

    with tracing.server_span("server", "llmo.cost.v1.CostService/Get", headers.get("traceparent")) as span:
        with ctx.bind(trace=span.trace):
            ...
        span.set_grpc_status(grpc.StatusCode.OK)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import grpc

from llmo.core.context import TraceContext
from llmo.core.logging import get_logger

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

log = get_logger(__name__)

Kind = Literal["server", "consumer"]
Attributes = Mapping[str, str | int | float | bool]

# gRPC codes that are the server's failure (OpenTelemetry's gRPC conventions); the
# others (INVALID_ARGUMENT, NOT_FOUND, ...) are the caller's and leave the span OK.
_GRPC_SERVER_ERRORS = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})


@dataclass
class _Sdk:
    """What a started span needs from OpenTelemetry, imported once by `configure_tracing`."""

    provider: TracerProvider
    tracer: Tracer
    kinds: dict[str, Any]
    parent: Any  # traceparent -> OpenTelemetry Context
    error: Any  # description -> Status(ERROR)


_sdk: _Sdk | None = None


def enabled() -> bool:
    return _sdk is not None


def configure_tracing(service_name: str, endpoint: str, *, schedule_delay_ms: int = 1000) -> bool:
    """Export spans of `service_name` to the OTLP/gRPC collector at `endpoint`
    (`host:port`, `http://host:port`, or `https://...` for TLS). Returns False,
    and installs nothing, when `endpoint` is empty."""
    global _sdk
    if not endpoint:
        return False
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if _sdk is not None:
        shutdown_tracing()
    provider = TracerProvider(resource=Resource.create({"service.name": f"llmo-{service_name}"}),
                              shutdown_on_exit=False)
    # a short export timeout: a collector that is down must not hold a stopping service for long
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"), timeout=5)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=schedule_delay_ms))

    def parent(traceparent: str | None) -> Any:
        incoming = TraceContext.parse(traceparent)
        if incoming is None:
            return otel_context.Context()  # a root span, whatever OpenTelemetry context is ambient
        remote = trace.SpanContext(int(incoming.trace_id, 16), int(incoming.span_id, 16), is_remote=True,
                                   trace_flags=trace.TraceFlags(int(incoming.flags, 16)))
        return trace.set_span_in_context(trace.NonRecordingSpan(remote), otel_context.Context())

    _sdk = _Sdk(
        provider=provider,
        tracer=provider.get_tracer("llmo"),
        kinds={"server": trace.SpanKind.SERVER, "consumer": trace.SpanKind.CONSUMER},
        parent=parent,
        error=lambda description: trace.Status(trace.StatusCode.ERROR, description),
    )
    log.info("tracing enabled", exporter="otlp-grpc", endpoint=endpoint)
    return True


def shutdown_tracing(timeout_s: float = 3.0) -> None:
    """Export what is buffered and stop the exporter (blocking: call it with asyncio.to_thread)."""
    global _sdk
    sdk, _sdk = _sdk, None
    if sdk is None:
        return
    if not sdk.provider.force_flush(int(timeout_s * 1000)):
        log.warning("tracing: spans still unexported at shutdown", timeout_s=timeout_s)
    sdk.provider.shutdown()


class Span:
    """One started span (or, with tracing off, only the trace context it binds)."""

    __slots__ = ("_span", "trace")

    def __init__(self, trace: TraceContext, span: Any = None) -> None:
        self.trace = trace
        self._span = span

    def set_attribute(self, key: str, value: str | int | float | bool) -> None:
        if self._span is not None:
            self._span.set_attribute(key, value)

    def fail(self, description: str) -> None:
        if self._span is not None and _sdk is not None:
            self._span.set_status(_sdk.error(description))

    def set_grpc_status(self, code: grpc.StatusCode) -> None:
        """Record the call's status code; server faults mark the span failed."""
        if self._span is None:
            return
        self._span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in _GRPC_SERVER_ERRORS:
            self.fail(code.name)

    def set_http_status(self, status: int) -> None:
        """Record the response status; a 5xx marks the span failed."""
        if self._span is None:
            return
        self._span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.fail(f"HTTP {status}")

    def end(self) -> None:
        """End the span (once; later calls do nothing)."""
        span, self._span = self._span, None
        if span is not None:
            span.end()


def start_span(kind: Kind, name: str, traceparent: str | None, attributes: Attributes | None = None) -> Span:
    """Start a span whose parent is `traceparent` (a new trace when it is missing or invalid)."""
    sdk = _sdk
    if sdk is None:
        incoming = TraceContext.parse(traceparent)
        return Span(incoming.child() if incoming else TraceContext.new())
    span = sdk.tracer.start_span(name, context=sdk.parent(traceparent), kind=sdk.kinds[kind], attributes=attributes)
    ids = span.get_span_context()
    return Span(TraceContext(f"{ids.trace_id:032x}", f"{ids.span_id:016x}", f"{ids.trace_flags:02x}"), span)


@contextlib.contextmanager
def server_span(kind: Kind, name: str, traceparent: str | None, attributes: Attributes | None = None) -> Iterator[Span]:
    """`start_span` as a context manager: an exception fails the span; the span ends on exit."""
    span = start_span(kind, name, traceparent, attributes)
    try:
        yield span
    except BaseException as error:
        span.fail(type(error).__name__)
        raise
    finally:
        span.end()


def rpc_span(method: str, traceparent: str | None) -> Span:
    """The span of one gRPC call; `method` is the full method (`/package.Service/Method`).

    Call `span.set_grpc_status(code)`, then `span.end()`."""
    if _sdk is None:
        return start_span("server", method, traceparent)
    service, _, name = method.lstrip("/").partition("/")
    return start_span("server", method.lstrip("/"), traceparent,
                      {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})


def http_span(request_method: str, route: str, traceparent: str | None) -> contextlib.AbstractContextManager[Span]:
    """The span of one HTTP request; `route` is the route template (e.g. `/v1/chat/completions`).

    Call `span.set_http_status(response.status)` before it ends."""
    return server_span("server", f"{request_method} {route}", traceparent,
                       {"http.request.method": request_method, "http.route": route})


class MessageSpans:
    """One consumer span per message of a batch; `trace` (the first message's span) is what the
    batch handler binds for its logs."""

    __slots__ = ("spans", "trace")

    def __init__(self, trace: TraceContext | None, spans: list[Span]) -> None:
        self.trace = trace
        self.spans = spans

    def fail(self, index: int, description: str) -> None:
        if self.spans:
            self.spans[index].fail(description)

    def end(self, error: BaseException | None = None) -> None:
        for span in self.spans:
            if error is not None:
                span.fail(type(error).__name__)
            span.end()


def message_spans(subject: str, consumer: str, traceparents: Iterable[str | None]) -> MessageSpans:
    """Start a consumer span per message (parented by each message's `traceparent`).

    With tracing off only the first traceparent is read and no span is made, so a
    generator costs nothing per message."""
    if _sdk is None:
        first = next(iter(traceparents), None)
        incoming = TraceContext.parse(first)
        return MessageSpans(incoming.child() if incoming else None, [])
    attributes = {"messaging.system": "nats", "messaging.destination.name": subject,
                  "messaging.consumer.group.name": consumer, "messaging.operation.type": "process"}
    spans = [start_span("consumer", f"process {subject}", parent, attributes) for parent in traceparents]
    return MessageSpans(spans[0].trace if spans else None, spans)
