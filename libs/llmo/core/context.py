"""Per-request and per-message context: request id, tenant, trace, deadline.

Values live in contextvars so they flow through `await` and into log lines
(structlog merges its own contextvars; `bind()` sets both).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

import structlog

_tenant: ContextVar[str | None] = ContextVar("llmo_tenant", default=None)
# Whether the caller may act across tenants (see llmo.core.auth.scoped_tenant).
_admin: ContextVar[bool] = ContextVar("llmo_admin", default=False)
_request_id: ContextVar[str | None] = ContextVar("llmo_request_id", default=None)
_trace: ContextVar[TraceContext | None] = ContextVar("llmo_trace", default=None)
_deadline: ContextVar[float | None] = ContextVar("llmo_deadline", default=None)

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(frozen=True)
class TraceContext:
    """W3C trace context (https://www.w3.org/TR/trace-context/), version 00."""

    trace_id: str
    span_id: str
    flags: str = "01"

    @classmethod
    def parse(cls, header: str | None) -> TraceContext | None:
        if not header:
            return None
        match = _TRACEPARENT.match(header.strip().lower())
        if not match or set(match.group(1)) == {"0"} or set(match.group(2)) == {"0"}:
            return None
        return cls(match.group(1), match.group(2), match.group(3))

    @classmethod
    def new(cls) -> TraceContext:
        return cls(secrets.token_hex(16), secrets.token_hex(8))

    def child(self) -> TraceContext:
        """A new span in the same trace (what we send downstream)."""
        return TraceContext(self.trace_id, secrets.token_hex(8), self.flags)

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


def new_request_id() -> str:
    return os.urandom(8).hex()


def current_tenant() -> str | None:
    return _tenant.get()


def is_admin() -> bool:
    """True when the caller may act on every tenant: an admin tenant's key, or
    authentication off (development). False outside a call."""
    return _admin.get()


def current_request_id() -> str | None:
    return _request_id.get()


def current_trace() -> TraceContext | None:
    return _trace.get()


def remaining_seconds() -> float | None:
    """Time left before the deadline of the RPC being served, if it has one."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


@contextlib.contextmanager
def bind(
    *,
    tenant: str | None = None,
    admin: bool | None = None,
    request_id: str | None = None,
    trace: TraceContext | None = None,
    timeout: float | None = None,
    **log_fields: object,
) -> Iterator[None]:
    """Bind request context for the duration of a call or message handler."""
    tokens: list[tuple[ContextVar[Any], Token[Any]]] = []
    fields: dict[str, object] = dict(log_fields)
    if tenant is not None:
        tokens.append((_tenant, _tenant.set(tenant)))
        fields["tenant"] = tenant
    if admin is not None:
        tokens.append((_admin, _admin.set(admin)))
    if request_id is not None:
        tokens.append((_request_id, _request_id.set(request_id)))
        fields["request_id"] = request_id
    if trace is not None:
        tokens.append((_trace, _trace.set(trace)))
        fields["trace_id"] = trace.trace_id
        fields["span_id"] = trace.span_id
    if timeout is not None:
        tokens.append((_deadline, _deadline.set(time.monotonic() + timeout)))
    log_tokens = structlog.contextvars.bind_contextvars(**fields)
    try:
        yield
    finally:
        try:
            structlog.contextvars.reset_contextvars(**log_tokens)
            for var, token in reversed(tokens):
                var.reset(token)
        except ValueError:
            # A cancelled stream's generator finalised from another context: the
            # context these values were set in is gone, so there is nothing to restore.
            pass
