"""The shared HTTP edge over a real socket: auth and tenants, request ids, the one
error body, body bounds, hostile JSON, health and per-route metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from llmo.core import context as ctx
from llmo.core.errors import invalid_argument
from llmo.core.http_edge import caller_of, edge_app, read_json, start_site
from llmo.core.settings import PlatformSettings

KEYS = {"k1": "tenant-a", "k2": "tenant-b", "ksvc": "svc"}
SERVICE = "edge-test"


async def whoami(request: web.Request) -> web.Response:
    caller = caller_of(request)
    return web.json_response({"tenant": caller.tenant, "request_id": ctx.current_request_id(),
                              "trace_id": (ctx.current_trace() or ctx.TraceContext.new()).trace_id})


async def echo(request: web.Request) -> web.Response:
    body = await read_json(request)
    return web.json_response({"keys": sorted(body)})


async def refuse(request: web.Request) -> web.Response:
    raise invalid_argument("BAD_THING", "temperature must be in [0, 2]", field="temperature")


async def crash(request: web.Request) -> web.Response:
    raise ZeroDivisionError("a bug")


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    platform = PlatformSettings(api_keys=KEYS, admin_tenants=frozenset({"svc"}))
    app = edge_app(SERVICE, platform, max_body_bytes=64 * 1024)
    app.add_routes([web.get("/whoami", whoami), web.post("/echo", echo), web.get("/refuse", refuse),
                    web.get("/crash", crash)])
    runner, port = await start_site(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def call(method: str, url: str, *, key: str | None = "k1", **kwargs: Any) -> tuple[int, dict[str, Any], Any]:
    headers = dict(kwargs.pop("headers", {}))
    if key:
        headers["authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as session, session.request(method, url, headers=headers, **kwargs) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.json()


def assert_error(body: Any, code: str) -> None:
    error = body["error"]
    assert error["code"] == code
    assert set(error) >= {"message", "type", "code", "param", "request_id"}
    assert error["request_id"]


async def test_keys_map_to_tenants_and_ids_are_minted(base_url: str) -> None:
    ids = set()
    for _ in range(3):
        status, headers, body = await call("GET", f"{base_url}/whoami", headers={"x-request-id": "reuse-1"})
        assert status == 200 and body["tenant"] == "tenant-a"
        assert headers["x-request-id"] == body["request_id"]
        ids.add(body["request_id"])
    assert "reuse-1" not in ids and len(ids) == 3


async def test_a_service_key_acts_for_an_end_tenant_with_its_own_request_id(base_url: str) -> None:
    trace = ctx.TraceContext.new()
    status, _, body = await call("GET", f"{base_url}/whoami", key="ksvc",
                                 headers={"x-llmo-tenant": "tenant-b", "x-request-id": "svc-1",
                                          "traceparent": trace.header()})
    assert status == 200
    assert body == {"tenant": "tenant-b", "request_id": "svc-1", "trace_id": trace.trace_id}


async def test_a_tenant_may_not_act_for_another(base_url: str) -> None:
    status, _, body = await call("GET", f"{base_url}/whoami", headers={"x-llmo-tenant": "tenant-b"})
    assert status == 403
    assert_error(body, "ON_BEHALF_FORBIDDEN")


@pytest.mark.parametrize(("key", "code"), [(None, "API_KEY_MISSING"), ("nope", "API_KEY_INVALID")])
async def test_bad_keys_are_401_with_the_error_body(base_url: str, key: str | None, code: str) -> None:
    status, headers, body = await call("GET", f"{base_url}/whoami", key=key)
    assert status == 401 and headers["x-request-id"] == body["error"]["request_id"]
    assert_error(body, code)


async def test_service_errors_map_through_the_status_table_with_param(base_url: str) -> None:
    status, _, body = await call("GET", f"{base_url}/refuse")
    assert status == 400
    assert_error(body, "BAD_THING")
    assert body["error"]["param"] == "temperature" and body["error"]["type"] == "invalid_request_error"


async def test_a_bug_is_a_json_500_with_the_request_id_never_a_text_page(base_url: str) -> None:
    status, headers, body = await call("GET", f"{base_url}/crash")
    assert status == 500
    assert_error(body, "INTERNAL")
    assert headers["x-request-id"] in body["error"]["message"]
    assert "ZeroDivisionError" not in body["error"]["message"]


async def test_unknown_routes_and_methods_get_the_error_body(base_url: str) -> None:
    status, _, body = await call("GET", f"{base_url}/nowhere")
    assert status == 404
    assert_error(body, "ROUTE_NOT_FOUND")
    status, _, body = await call("DELETE", f"{base_url}/echo")
    assert status == 405
    assert_error(body, "METHOD_NOT_ALLOWED")


async def test_bodies_over_the_bound_are_413(base_url: str) -> None:
    status, _, body = await call("POST", f"{base_url}/echo", data=b'{"a": "' + b"x" * 100_000 + b'"}',
                                 headers={"content-type": "application/json"})
    assert status == 413
    assert_error(body, "BODY_TOO_LARGE")


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "INVALID_JSON"),
        (b"{not json", "INVALID_JSON"),
        (b"\xff\xfe{}", "INVALID_JSON"),
        (b"[" * 5000 + b"]" * 5000, "INVALID_JSON"),
        (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", "INVALID_JSON"),
        (b"[1, 2]", "INVALID_JSON"),
        (b'{"content": "\\ud800x"}', "INVALID_UNICODE"),
    ],
)
async def test_hostile_json_is_a_400(base_url: str, raw: bytes, code: str) -> None:
    status, _, body = await call("POST", f"{base_url}/echo", data=raw, headers={"content-type": "application/json"})
    assert status == 400, body
    assert_error(body, code)


async def test_paired_surrogate_escapes_and_brackets_inside_strings_are_fine(base_url: str) -> None:
    raw = b'{"emoji": "\\ud83d\\ude00", "text": "' + b"[" * 200 + b'"}'
    status, _, body = await call("POST", f"{base_url}/echo", data=raw, headers={"content-type": "application/json"})
    assert status == 200 and body == {"keys": ["emoji", "text"]}


async def test_health_needs_no_key_and_routes_are_counted_by_template(base_url: str) -> None:
    status, _, body = await call("GET", f"{base_url}/healthz", key=None)
    assert status == 200 and body == {"status": "ok"}
    status, _, body = await call("GET", f"{base_url}/readyz", key=None)
    assert status == 200
    await call("GET", f"{base_url}/refuse")
    count = REGISTRY.get_sample_value("llmo_http_requests_total",
                                      {"service": SERVICE, "route": "/refuse", "status": "400"})
    assert count is not None and count >= 1
