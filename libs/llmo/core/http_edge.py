"""The HTTP edge every HTTP service runs (aiohttp).

`edge_middleware` does for an HTTP request what the gRPC interceptor does for a
call: it resolves the caller from the API key (same keys, tenants and
on-behalf-of rule, `llmo.core.auth.resolve_caller`), binds request id / tenant /
`traceparent` for the logs and for downstream calls and events, records
Prometheus metrics per route, and turns every error into one JSON body:

    {"error": {"message", "type", "code", "param", "request_id"}}

where `code` is the ErrorInfo reason and the HTTP status is derived from the
gRPC code (`HTTP_STATUS`). No request ever gets a plain-text 500 page; every
response carries `x-request-id`. Bodies are bounded (`client_max_size`, 413)
and `read_json` rejects malformed, too deeply nested or unencodable JSON with a
400, parsing large bodies off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import Counter, Histogram

from llmo.core import context as ctx
from llmo.core import tracing
from llmo.core.auth import Caller, resolve_caller
from llmo.core.errors import ServiceError, invalid_argument
from llmo.core.limits import preview
from llmo.core.logging import get_logger
from llmo.core.settings import PlatformSettings

log = get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The canonical gRPC -> HTTP mapping (google/rpc/code.proto).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
# OpenAI's error `type` per HTTP status.
ERROR_TYPE: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
# HTTP statuses aiohttp raises itself, as ErrorInfo-style reasons.
_HTTP_REASON = {404: "ROUTE_NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "BODY_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE"}

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_JSON_DEPTH = 64
# Bodies above this are parsed on a worker thread.
_PARSE_INLINE_BYTES = 256 * 1024
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

CALLER_KEY = web.RequestKey("llmo_caller", Caller)

HTTP_REQUESTS = Counter("llmo_http_requests_total", "HTTP requests handled", ["service", "route", "status"])
HTTP_LATENCY = Histogram(
    "llmo_http_request_duration_seconds",
    "HTTP request duration (to the response headers for streams)",
    ["service", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
)


def error_payload(status: int, message: str, code: str, param: str | None = None,
                  request_id: str | None = None, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"message": message, "type": ERROR_TYPE.get(status, "api_error"), "code": code,
                             "param": param, "request_id": request_id or ctx.current_request_id()}
    if metadata:
        error["metadata"] = metadata
    return {"error": error}


def error_of(err: ServiceError) -> tuple[int, dict[str, Any]]:
    """(HTTP status, error body) of a ServiceError (`param` is the ErrorInfo `field`, when the error
    names one); also what a stream sends when it fails after its 200."""
    status = HTTP_STATUS.get(err.code, 500)
    metadata = {k: v for k, v in err.metadata.items() if k != "field"}
    return status, error_payload(status, err.message, err.reason, err.metadata.get("field") or None, metadata=metadata)


def service_error_response(err: ServiceError) -> web.Response:
    """The JSON response of a ServiceError."""
    status, body = error_of(err)
    return web.json_response(body, status=status, headers=_id_header())


def _id_header() -> dict[str, str]:
    request_id = ctx.current_request_id()
    return {"x-request-id": request_id} if request_id else {}


def caller_of(request: web.Request) -> Caller:
    """The caller the edge resolved for this request (not set on public paths)."""
    caller = request.get(CALLER_KEY)
    if caller is None:
        raise RuntimeError(f"{request.path} is a public path: no caller was resolved")
    return caller


def edge_middleware(
    service: str, platform: PlatformSettings, *, public_paths: Collection[str] = PUBLIC_PATHS
) -> Middleware:
    """The middleware of `service`'s HTTP app: auth, context, metrics and the one error body."""

    @web.middleware
    async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        route = _route_of(request)
        headers = {k.lower(): v for k, v in request.headers.items()}
        status = 500
        span = tracing.start_span("server", f"{request.method} {route}", headers.get("traceparent"),
                                  {"http.request.method": request.method, "http.route": route})
        trace = span.trace
        try:
            if request.path in public_paths:
                with ctx.bind(request_id=ctx.new_request_id(), trace=trace, route=route):
                    response = await _guarded(request, handler)
            else:
                try:
                    caller = resolve_caller(headers, platform.api_keys, platform.admin_tenants,
                                            default_tenant=platform.default_tenant)
                except ServiceError as err:
                    with ctx.bind(request_id=ctx.new_request_id(), trace=trace, route=route):
                        log.info("http request refused", code=err.reason)
                        response = service_error_response(err)
                        status = response.status
                        return response
                request[CALLER_KEY] = caller
                extra: dict[str, Any] = (
                    {"client_request_id": caller.client_request_id} if caller.client_request_id else {}
                )
                with ctx.bind(request_id=caller.request_id, trace=trace, tenant=caller.tenant, admin=caller.admin,
                              route=route, **extra):
                    response = await _guarded(request, handler)
            status = response.status
            return response
        finally:
            span.set_http_status(status)
            span.end()
            HTTP_REQUESTS.labels(service, route, str(status)).inc()
            HTTP_LATENCY.labels(service, route).observe(time.perf_counter() - started)

    return edge


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Run the handler; every failure becomes the JSON error body (the stream, once prepared, is left alone)."""
    try:
        response = await handler(request)
    except ServiceError as err:
        log.info("http request failed", code=err.code.name, reason=err.reason, error=preview(err.message, 200))
        return service_error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = _HTTP_REASON.get(exc.status, "HTTP_ERROR")
        message = exc.text if exc.status == 413 and exc.text else exc.reason
        return web.json_response(error_payload(exc.status, message, reason), status=exc.status, headers=_id_header())
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("http handler failed", path=request.path)
        request_id = ctx.current_request_id()
        body = error_payload(500, f"internal error (request id {request_id})", "INTERNAL")
        return web.json_response(body, status=500, headers=_id_header())
    if not response.prepared:
        request_id = ctx.current_request_id()
        if request_id and "x-request-id" not in response.headers:
            response.headers["x-request-id"] = request_id
    return response


def _route_of(request: web.Request) -> str:
    """The route template (bounded label cardinality), not the raw path."""
    resource = request.match_info.route.resource
    if resource is None:
        return "unmatched"
    canonical = resource.canonical
    return canonical or "unmatched"


async def read_json(request: web.Request, *, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """The request body as a JSON object, or INVALID_ARGUMENT (`INVALID_JSON`).

    Rejects bodies that are not UTF-8, not JSON, nested deeper than `max_depth`,
    not an object, or holding lone UTF-16 surrogates (`"\\ud800"`), which no
    tokenizer can encode. Bodies over the app's `client_max_size` get 413.
    """
    raw = await request.read()
    if len(raw) > _PARSE_INLINE_BYTES:
        return await asyncio.to_thread(parse_json_object, raw, max_depth)
    return parse_json_object(raw, max_depth)


def parse_json_object(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    if not raw.strip():
        raise invalid_argument("INVALID_JSON", "the request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid_argument("INVALID_JSON", f"the request body is not UTF-8 (byte {exc.start})") from None
    _check_depth(text, max_depth)
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise invalid_argument("INVALID_JSON", f"the request body is not JSON: {exc.msg} at line {exc.lineno} "
                               f"column {exc.colno}") from None
    except RecursionError:
        raise invalid_argument("INVALID_JSON", f"the request body nests deeper than {max_depth} levels") from None
    if not isinstance(body, dict):
        raise invalid_argument("INVALID_JSON", f"the request body must be a JSON object, not {type(body).__name__}")
    _check_strings(body, "")
    return body


def _check_depth(text: str, max_depth: int) -> None:
    """Reject deep nesting before parsing (brackets inside strings count too: a bound, not a parser)."""
    if text.count("[") + text.count("{") <= max_depth:
        return
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                raise invalid_argument("INVALID_JSON", f"the request body nests deeper than {max_depth} levels")
        elif char in "]}":
            depth -= 1


def _check_strings(value: Any, path: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid_argument("INVALID_UNICODE", f"{path or 'a string'} holds a lone UTF-16 surrogate",
                                   field=path.split(".")[0].split("[")[0] or "body") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, path)
            _check_strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_strings(item, f"{path}[{index}]")


def health_routes(ready: Callable[[], bool]) -> list[web.RouteDef]:
    """`/healthz` (the process is alive) and `/readyz` (it is serving: 503 while starting or draining)."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    return [web.get("/healthz", healthz), web.get("/readyz", readyz)]


def edge_app(service: str, platform: PlatformSettings, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
             ready: Callable[[], bool] = lambda: True, public_paths: Collection[str] = PUBLIC_PATHS) -> web.Application:
    """An aiohttp application with the edge middleware, a body bound and the health routes."""
    app = web.Application(middlewares=[edge_middleware(service, platform, public_paths=public_paths)],
                          client_max_size=max_body_bytes)
    app.add_routes(health_routes(ready))
    return app


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0 picks a free port); returns the runner and the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    addresses = runner.addresses
    bound = int(addresses[0][1]) if addresses else port
    return runner, bound
