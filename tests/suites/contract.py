"""What every answer to generated input must satisfy, and the tally the lead reads.

A violation raises a class of its own per kind of defect (hypothesis then reports distinct
defects of one case separately) and is counted; `summary()` is written at session end.
"""

from __future__ import annotations

import json
import re
import threading
from collections import defaultdict
from typing import Any

import grpc

from llmo.core.errors import error_info

# Codes a bad request may get. UNAVAILABLE is not among them: the upstreams of the suite's
# stack are up and idle, so a 503 for a request is the service blaming its input on them.
CLIENT_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.ABORTED,
})
MAX_ERROR_BYTES = 4096
REASON = re.compile(r"^[A-Z][A-Z0-9_]*$")


class ContractViolation(AssertionError):
    pass


class ServerFault(ContractViolation):
    """INTERNAL / UNKNOWN / UNAVAILABLE / DEADLINE_EXCEEDED / 5xx for a request."""


class MissingErrorInfo(ContractViolation):
    """An error without a google.rpc.ErrorInfo of the service's domain and a stable reason."""


class UnboundedEcho(ContractViolation):
    """An error message or ErrorInfo that copies unbounded input."""


class BadErrorBody(ContractViolation):
    """An HTTP error without the OpenAI JSON error body."""


_lock = threading.Lock()
_tried: dict[str, int] = defaultdict(int)
_violations: dict[str, int] = defaultdict(int)
_failing: dict[str, dict[str, str]] = defaultdict(dict)  # service -> case id -> last (smallest) violation
_reasons: dict[str, set[str]] = defaultdict(set)


def tried(service: str) -> None:
    with _lock:
        _tried[service] += 1


def _violate(service: str, case: str, kind: type[ContractViolation], what: str) -> None:
    with _lock:
        _violations[service] += 1
        _failing[service][case] = f"{kind.__name__}: {what}"
    raise kind(f"{service} {case}: {what}")


def preview(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def check_rpc_error(service: str, case: str, error: grpc.RpcError, sent: str) -> None:
    """A failed call: a client code, ErrorInfo of llmo.<service> with a reason, bounded text."""
    code = error.code()  # type: ignore[attr-defined]
    details = error.details() or ""  # type: ignore[attr-defined]
    where = f"{code.name} {preview(details, 160)!r} for {sent}"
    if code not in CLIENT_CODES:
        _violate(service, case, ServerFault, where)
    info = error_info(error)
    if info is None or not REASON.match(info.reason) or info.domain != f"llmo.{service}":
        _violate(service, case, MissingErrorInfo, f"{where}; ErrorInfo={info}")
    assert info is not None
    with _lock:
        _reasons[service].add(f"{code.name} {info.reason}")
    if len(details.encode()) > MAX_ERROR_BYTES or any(len(v) > MAX_ERROR_BYTES for v in info.metadata.values()):
        _violate(service, case, UnboundedEcho, f"{code.name} {info.reason} with a {len(details)}-char message, "
                 f"metadata {[len(v) for v in info.metadata.values()]} chars, for {sent}")


def check_http(service: str, case: str, status: int, content_type: str, body: bytes, sent: str) -> None:
    where = f"HTTP {status} {preview(body.decode(errors='replace'), 160)!r} for {sent}"
    if status >= 500:
        _violate(service, case, ServerFault, where)
    if status < 400:
        return
    try:
        payload = json.loads(body)
        error = payload["error"]
        shaped = (isinstance(error, dict) and {"message", "type", "code", "param"} <= error.keys()
                  and isinstance(error["message"], str) and bool(error["message"]) and isinstance(error["type"], str))
    except (ValueError, KeyError, TypeError):
        shaped = False
    if not shaped or "json" not in content_type:
        _violate(service, case, BadErrorBody, f"{where} ({content_type})")
    if len(body) > MAX_ERROR_BYTES:
        _violate(service, case, UnboundedEcho, f"HTTP {status} with a {len(body)}-byte error body for {sent}")
    with _lock:
        _reasons[service].add(f"HTTP {status} {payload['error'].get('code')}")


def summary() -> dict[str, Any]:
    with _lock:
        services = sorted(set(_tried) | set(_violations))
        return {name: {"inputs_tried": _tried[name], "inputs_failed": _violations[name],
                       "failing_cases": dict(sorted(_failing[name].items())),
                       "error_reasons_seen": sorted(_reasons[name])} for name in services}
