"""Prometheus metrics shared by every server and consumer, and the /metrics endpoint."""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from llmo.core.logging import get_logger
from llmo.core.settings import ServiceSettings

log = get_logger(__name__)

GRPC_REQUESTS = Counter(
    "llmo_grpc_requests_total", "gRPC calls handled", ["service", "method", "code"]
)
GRPC_LATENCY = Histogram(
    "llmo_grpc_request_duration_seconds",
    "gRPC call duration",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
GRPC_IN_FLIGHT = Gauge("llmo_grpc_in_flight", "gRPC calls being served", ["service"])
EVENTS_PUBLISHED = Counter("llmo_events_published_total", "Events published", ["subject"])
EVENTS_HANDLED = Counter(
    "llmo_events_handled_total", "Events handled by consumers", ["consumer", "outcome"]
)
EVENTS_DEAD_LETTERED = Counter(
    "llmo_events_dead_lettered_total", "Events sent to a dead-letter subject", ["consumer", "reason"]
)
OUTBOX_DEPTH = Gauge("llmo_outbox_depth", "Events in the outbox not yet acknowledged by JetStream", ["service"])
OUTBOX_OLDEST_AGE = Gauge(
    "llmo_outbox_oldest_age_seconds", "Age of the oldest event waiting in the outbox (0 when empty)", ["service"]
)
OUTBOX_APPEND_LATENCY = Histogram(
    "llmo_outbox_append_duration_seconds",
    "Time publish() waits for its event to be written to the outbox",
    ["service"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
)
OUTBOX_PUBLISH_FAILURES = Counter(
    "llmo_outbox_publish_failures_total", "Outbox publishes to JetStream that failed (retried later)", ["service", "reason"]
)

_servers: list[Any] = []
_lock = threading.Lock()


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serve /metrics on a background thread; returns the bound port (0 picks one)."""
    server, _thread = start_http_server(port, addr=host)
    with _lock:
        _servers.append(server)
    return int(server.server_address[1])


def start_service_metrics(settings: ServiceSettings) -> int | None:
    """Serve /metrics on a service's metrics port (unless disabled).

    A port that is already taken is logged rather than fatal: losing metrics
    must not take the service itself down.
    """
    port = settings.resolved_metrics_port()
    if port is None:
        return None
    try:
        return start_metrics_server(port, settings.host)
    except OSError as error:
        log.warning("metrics endpoint not started", port=port, error=str(error))
        return None


def stop_metrics_servers() -> None:
    with _lock:
        servers, _servers[:] = list(_servers), []
    for server in servers:
        server.shutdown()
        server.server_close()
