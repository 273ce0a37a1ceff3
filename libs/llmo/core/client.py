"""gRPC client helpers: channels with a retry policy, metadata and deadline propagation."""

from __future__ import annotations

import json

import grpc

from llmo.core import context as ctx

DEFAULT_TIMEOUT_SECONDS = 10.0


def retry_service_config(*, max_attempts: int = 4) -> str:
    """gRPC service config: retry UNAVAILABLE with exponential backoff, for every method.

    Only UNAVAILABLE is retried: the call never reached a server that could have
    acted on it, so retrying cannot apply a side effect twice.
    """
    return json.dumps(
        {
            # Spread calls over every address a name resolves to (headless Services).
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{}],
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": "0.05s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def create_channel(target: str, *, max_attempts: int = 4) -> grpc.aio.Channel:
    """An insecure channel to `host:port` with keepalive, and retries unless `max_attempts` is 1."""
    options: list[tuple[str, object]] = [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]
    if max_attempts > 1:
        options += [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", retry_service_config(max_attempts=max_attempts)),
        ]
    else:
        options += [
            ("grpc.enable_retries", 0),
            ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
        ]
    return grpc.aio.insecure_channel(target, options=options)


def outgoing_metadata(api_key: str | None = None, *, on_behalf_of: str | None = None) -> list[tuple[str, str]]:
    """Metadata for a downstream call: API key, request id and the trace (the current span as parent).

    `on_behalf_of` names the end tenant when a service calls for a caller; the
    downstream service honours it only from an admin key (see `llmo.core.auth`)."""
    metadata: list[tuple[str, str]] = []
    if api_key:
        metadata.append(("authorization", f"Bearer {api_key}"))
    if on_behalf_of:
        metadata.append(("x-llmo-tenant", on_behalf_of))
    request_id = ctx.current_request_id()
    if request_id:
        metadata.append(("x-request-id", request_id))
    trace = ctx.current_trace()
    if trace:
        # the span being served is the parent: it is the one exported and logged (llmo.core.tracing)
        metadata.append(("traceparent", trace.header()))
    return metadata


def call_timeout(default: float = DEFAULT_TIMEOUT_SECONDS) -> float:
    """Timeout for a downstream call: never past the deadline of the call being served."""
    remaining = ctx.remaining_seconds()
    if remaining is None:
        return default
    return max(0.001, min(default, remaining))
