"""OpenTelemetry tracing over real sockets: spans exported over OTLP/gRPC to a
receiver started here, parented across two service processes by `traceparent`,
with the ids the logs carry; and nothing of the SDK loaded without an endpoint.

Run as a program (`python -m tests.integration.core.test_tracing NAME PORT_FILE
[DOWNSTREAM_PORT]`) this file is a relay service: `Relay` calls the same method
on DOWNSTREAM_PORT, if given, with `outgoing_metadata()`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from llmo.core import context as ctx
from llmo.core import tracing
from llmo.core.client import create_channel, outgoing_metadata
from llmo.core.events import Consumer, Delivery, EventBus
from llmo.core.logging import get_logger
from llmo.core.natsd import NatsServer
from llmo.core.server import GrpcServer, serve_until_signal
from llmo.core.settings import ServiceSettings
from llmo.protos.common.v1 import common_pb2
from llmo.protos.events.v1 import events_pb2

log = get_logger(__name__)

SERVICE = "llmo.test.v1.RelayService"
METHOD = f"/{SERVICE}/Relay"
ROOT = Path(__file__).resolve().parents[3]


# --- the relay service (run in a child process) ---------------------------------------------------

class RelaySettings(ServiceSettings):
    service = "cost"  # borrows a default port table entry; the relay always binds port 0


@dataclass
class _Running:
    server: GrpcServer
    channel: grpc.aio.Channel | None

    async def stop(self) -> None:
        await self.server.stop(1.0)
        if self.channel is not None:
            await self.channel.close()


def _relay_server(settings: RelaySettings, downstream: int | None) -> tuple[GrpcServer, grpc.aio.Channel | None]:
    channel = create_channel(f"127.0.0.1:{downstream}") if downstream else None
    call = channel.unary_unary(METHOD, request_serializer=common_pb2.Usage.SerializeToString,
                               response_deserializer=common_pb2.Usage.FromString) if channel else None

    async def relay(request: common_pb2.Usage, context: grpc.aio.ServicerContext) -> common_pb2.Usage:
        log.info("relay call", downstream=downstream)
        if call is None:
            return common_pb2.Usage(output_tokens=request.output_tokens + 1)
        reply: common_pb2.Usage = await call(request, metadata=outgoing_metadata(), timeout=5.0)
        return common_pb2.Usage(output_tokens=reply.output_tokens + 1)

    def add(_servicer: object, server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            relay, request_deserializer=common_pb2.Usage.FromString, response_serializer=common_pb2.Usage.SerializeToString
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Relay": handler}),))

    server = GrpcServer("test", settings, port=0)
    server.add_service(add, None, SERVICE)
    return server, channel


async def _serve_relay(name: str, port_file: str, downstream: int | None) -> None:
    async def start(settings: RelaySettings) -> _Running:
        server, channel = _relay_server(settings, downstream)
        Path(port_file).write_text(str(await server.start()))
        return _Running(server, channel)

    await serve_until_signal(name, RelaySettings(), start)


# --- an OTLP receiver ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    status: int
    attributes: dict[str, Any]


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """The collector side of OTLP/gRPC `TraceService/Export`, keeping every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []
        self.arrived = asyncio.Event()

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
                     context: grpc.aio.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    self.spans.append(ExportedSpan(resource.get("service.name", ""), span.name, span.kind,
                                                   span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(),
                                                   span.status.code, attributes))
        self.arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    def of(self, service: str) -> list[ExportedSpan]:
        return [span for span in self.spans if span.service == service]

    async def wait_for(self, count: int) -> None:
        while len(self.spans) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 30)


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    collector = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield collector, f"http://127.0.0.1:{port}"
    await server.stop(0)


# --- the tests -----------------------------------------------------------------------------------

def _start_relay(tmp_path: Path, name: str, endpoint: str, downstream: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    port_file = tmp_path / f"{name}.port"
    env = {**os.environ, "LLMO_OTEL_ENDPOINT": endpoint, "LLMO_ENV": "prod", "LLMO_API_KEYS": "", "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "tests.integration.core.test_tracing", name, str(port_file)]
    log_file = (tmp_path / f"{name}.log").open("wb")
    child = subprocess.Popen([*args, *([str(downstream)] if downstream else [])], cwd=ROOT, env=env,
                             stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text()):
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"{name} did not start:\n{(tmp_path / f'{name}.log').read_text()}")
        time.sleep(0.05)
    return child, int(port_file.read_text())


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
            child.wait()


def _log_lines(path: Path, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


async def test_a_call_through_two_services_is_one_trace_exported_by_both(
    tmp_path: Path, receiver: tuple[Receiver, str], processes: list[subprocess.Popen[bytes]]
) -> None:
    collector, endpoint = receiver
    back, back_port = await asyncio.to_thread(_start_relay, tmp_path, "back", endpoint)
    processes.append(back)
    front, front_port = await asyncio.to_thread(_start_relay, tmp_path, "front", endpoint, back_port)
    processes.append(front)

    caller = ctx.TraceContext.new()
    async with create_channel(f"127.0.0.1:{front_port}") as channel:
        call = channel.unary_unary(METHOD, request_serializer=common_pb2.Usage.SerializeToString,
                                   response_deserializer=common_pb2.Usage.FromString)
        reply = await call(common_pb2.Usage(output_tokens=1), metadata=(("traceparent", caller.header()),))
    assert reply.output_tokens == 3  # went through both

    # SIGTERM: serve_until_signal drains, then flushes the spans before the process exits
    for child in (front, back):
        child.send_signal(signal.SIGTERM)
    for child in (front, back):
        assert await asyncio.to_thread(child.wait, 30) == 0
    await collector.wait_for(2)

    (front_span,) = collector.of("llmo-front")
    (back_span,) = collector.of("llmo-back")
    assert front_span.name == back_span.name == METHOD.lstrip("/")
    assert front_span.kind == back_span.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert front_span.trace_id == back_span.trace_id == caller.trace_id
    assert front_span.parent_span_id == caller.span_id
    assert back_span.parent_span_id == front_span.span_id
    assert front_span.attributes["rpc.method"] == "Relay" and front_span.attributes["rpc.grpc.status_code"] == 0
    # the log lines of each call carry the ids of its exported span
    for name, span in (("front", front_span), ("back", back_span)):
        (line,) = _log_lines(tmp_path / f"{name}.log", "relay call")
        assert (line["trace_id"], line["span_id"]) == (span.trace_id, span.span_id)


async def test_a_consumed_event_gets_a_consumer_span_parented_by_its_traceparent(
    nats_server: NatsServer, receiver: tuple[Receiver, str]
) -> None:
    collector, endpoint = receiver
    assert tracing.configure_tracing("events-test", endpoint, schedule_delay_ms=50)
    bus = await EventBus(nats_server.url, name="tracing-test").connect()
    handled: list[ctx.TraceContext | None] = []

    async def handler(deliveries: list[Delivery[events_pb2.InferenceCompleted]]) -> None:
        handled.append(ctx.current_trace())

    consumer = Consumer(bus, events_pb2.InferenceCompleted, "tracing-test", handler, fetch_timeout=0.2)
    try:
        published = ctx.TraceContext.new()
        with ctx.bind(trace=published):
            await bus.publish(events_pb2.InferenceCompleted(event_id="evt-traced"))
        consumer.start()
        while not handled:
            await asyncio.sleep(0.02)
    finally:
        await consumer.stop()
        await bus.close()
        await asyncio.to_thread(tracing.shutdown_tracing)
    await collector.wait_for(1)

    (span,) = collector.of("llmo-events-test")
    assert span.kind == trace_pb2.Span.SPAN_KIND_CONSUMER
    assert span.trace_id == published.trace_id
    assert span.parent_span_id and span.parent_span_id != span.span_id
    assert span.attributes["messaging.destination.name"] == consumer.subject
    assert handled[0] is not None and (handled[0].trace_id, handled[0].span_id) == (span.trace_id, span.span_id)


async def test_the_cost_usage_consumer_exports_a_span_per_event(
    nats_server: NatsServer, receiver: tuple[Receiver, str], tmp_path: Path
) -> None:
    from llmo.cost.engine import CostEngine
    from llmo.cost.ingest import INFERENCE, UsageConsumer
    from llmo.cost.prices import load_catalog
    from llmo.cost.storage import CostStore

    collector, endpoint = receiver
    assert tracing.configure_tracing("cost-test", endpoint, schedule_delay_ms=50)
    store = CostStore.open(f"sqlite:///{tmp_path / 'cost.db'}")
    bus = await EventBus(nats_server.url, name="tracing-cost").connect()
    consumer = UsageConsumer(bus, CostEngine(store, load_catalog()), INFERENCE, "tracing-cost", batch=10)
    traces = {"good": ctx.TraceContext.new(), "unpriced": ctx.TraceContext.new()}
    try:
        for event_id, trace in traces.items():
            event = events_pb2.InferenceCompleted(event_id=event_id, model="gpt-4o" if event_id == "good" else "no-such-model",
                                                  attribution=common_pb2.Attribution(tenant="t"),
                                                  usage=common_pb2.Usage(input_tokens=10))
            event.occurred_at.GetCurrentTime()
            with ctx.bind(trace=trace):
                await bus.publish(event)
        await consumer.start()
        while store.ledger_totals()[0] < 1:
            await asyncio.sleep(0.02)
    finally:
        await consumer.stop()
        await bus.close()
        await asyncio.to_thread(tracing.shutdown_tracing)
    await collector.wait_for(2)

    spans = {span.trace_id: span for span in collector.of("llmo-cost-test")}
    good, unpriced = spans[traces["good"].trace_id], spans[traces["unpriced"].trace_id]
    assert good.kind == unpriced.kind == trace_pb2.Span.SPAN_KIND_CONSUMER
    assert good.status != trace_pb2.Status.STATUS_CODE_ERROR
    assert unpriced.status == trace_pb2.Status.STATUS_CODE_ERROR  # parked on the dead-letter subject


async def test_http_span_is_a_server_span_with_the_route_and_status(receiver: tuple[Receiver, str]) -> None:
    collector, endpoint = receiver
    caller = ctx.TraceContext.new()
    assert tracing.configure_tracing("http-test", endpoint, schedule_delay_ms=50)
    try:
        with tracing.http_span("POST", "/v1/chat/completions", caller.header()) as span:
            span.set_http_status(503)
    finally:
        await asyncio.to_thread(tracing.shutdown_tracing)
    await collector.wait_for(1)

    (exported,) = collector.of("llmo-http-test")
    assert exported.name == "POST /v1/chat/completions" and exported.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert (exported.trace_id, exported.parent_span_id) == (caller.trace_id, caller.span_id)
    assert (exported.trace_id, exported.span_id) == (span.trace.trace_id, span.trace.span_id)
    assert exported.attributes["http.route"] == "/v1/chat/completions"
    assert exported.attributes["http.response.status_code"] == 503
    assert exported.status == trace_pb2.Status.STATUS_CODE_ERROR


def test_without_an_endpoint_nothing_of_the_sdk_is_loaded() -> None:
    assert tracing.configure_tracing("off", "") is False and not tracing.enabled()
    probe = (
        "import sys; import llmo.core.server, llmo.core.events, llmo.core.tracing as t;"
        "from llmo.core.settings import PlatformSettings;"
        "assert not t.configure_tracing('x', PlatformSettings().otel_endpoint);"
        "span = t.rpc_span('/a.B/C', None); import grpc; span.set_grpc_status(grpc.StatusCode.INTERNAL); span.end();"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'));"
        "assert not loaded, loaded"
    )
    env = {k: v for k, v in os.environ.items() if k != "LLMO_OTEL_ENDPOINT"}
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


if __name__ == "__main__":
    asyncio.run(_serve_relay(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None))
