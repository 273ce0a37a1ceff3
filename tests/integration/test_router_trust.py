"""Issue 13 against the router's real HTTP front (aiohttp on a socket, a real upstream HTTP
server, a real nats-server): request ids the platform mints, the end tenant sent upstream,
one tenant's bad requests never opening the shared breaker, a cache key that covers every
sampling parameter, bounded bodies, and a JSON 4xx (never a 500 page) for bad input."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from llmo.core.events import EventBus
from llmo.protos.events.v1 import events_pb2

from .test_router_service import Harness, svc  # noqa: F401  (the router fixture)

Q = [{"role": "user", "content": "What is the capital city of France?"}]


async def post(h: Harness, body: Any, *, key: str = "key-a", headers: dict[str, str] | None = None,
               raw: bytes | None = None) -> tuple[int, dict[str, str], dict[str, Any]]:
    url = f"http://127.0.0.1:{h.router.http_port}/v1/chat/completions"
    sent = {"authorization": f"Bearer {key}", "content-type": "application/json", **(headers or {})}
    data = raw if raw is not None else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session, session.post(url, data=data, headers=sent) as resp:
        assert resp.content_type == "application/json", (resp.status, await resp.text())
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.json()


def assert_error(status: int, headers: dict[str, str], body: dict[str, Any], want_status: int, code: str,
                 param: str | None = None) -> None:
    assert status == want_status, body
    error = body["error"]
    assert set(error) >= {"message", "type", "code", "param", "request_id"}
    assert error["code"] == code, error
    assert error["request_id"] and headers["x-request-id"] == error["request_id"]
    if param is not None:
        assert error["param"] == param, error


async def test_a_reused_client_request_id_is_never_the_exactly_once_key(svc: Harness) -> None:  # noqa: F811
    bus = await EventBus(svc.nats.url).connect()
    await bus.ensure_stream("router")
    sub = await bus.js.pull_subscribe("llmo.router.v1.completed", durable="trust", stream="LLMO_ROUTER")
    ids = []
    for key in ("key-a", "key-a", "key-a", "key-b"):
        body = {"model": "small", "messages": Q, "llmo": {"skip_cache": True}}
        status, headers, answer = await post(svc, body, key=key, headers={"x-request-id": "reuse-1"})
        assert status == 200, answer
        assert answer["id"] != "reuse-1" and headers["x-request-id"] == answer["id"]
        assert headers["x-client-request-id"] == "reuse-1"  # echoed for the client's own logs
        ids.append(answer["id"])
    assert len(set(ids)) == 4
    assert svc.backend.request_ids == ids  # the upstream's usage events name the same calls
    events: dict[str, str] = {}
    while len(events) < 4:
        for m in await sub.fetch(4, timeout=10):
            done = events_pb2.RouterCompleted.FromString(m.data)
            events[done.event_id] = done.attribution.tenant
            await m.ack()
    assert sorted(events) == sorted(f"{i}:completed" for i in ids)
    assert sorted(events.values()) == ["tenant-a"] * 3 + ["tenant-b"]
    await bus.close()


async def test_upstream_calls_carry_the_end_tenant_and_attribution(svc: Harness) -> None:  # noqa: F811
    body = {"model": "small", "messages": Q, "user": "u-42", "seed": 7, "top_k": 5, "presence_penalty": 0.5,
            "frequency_penalty": -0.5, "top_p": 0.9, "temperature": 0.2, "stop": ["X"],
            "llmo": {"application": "shop", "skip_cache": True}}
    status, _, answer = await post(svc, body, key="key-b")
    assert status == 200, answer
    sent = svc.backend.headers[-1]
    assert sent["x-llmo-tenant"] == "tenant-b" and sent["x-request-id"] == answer["id"]
    assert sent["x-llmo-application"] == "shop"
    upstream = svc.backend.requests[-1]
    assert upstream["user"] == "u-42"
    assert {k: upstream[k] for k in ("seed", "top_k", "presence_penalty", "frequency_penalty", "top_p", "temperature", "stop")} == {
        "seed": 7, "top_k": 5, "presence_penalty": 0.5, "frequency_penalty": -0.5, "top_p": 0.9, "temperature": 0.2,
        "stop": ["X"]}


async def test_one_tenants_bad_requests_never_open_the_breaker_for_another(svc: Harness) -> None:  # noqa: F811
    # Caught by the router itself: nothing reaches the upstream.
    for _ in range(5):
        assert_error(*await post(svc, {"model": "small", "messages": Q, "temperature": -1}), 400,
                     "INVALID_SAMPLING_PARAMS", "temperature")
    assert svc.backend.calls == {}
    # Refused by the upstream (HTTP 400), more often than the breaker's limit of 5.
    svc.backend.behaviours["small"] = "reject"
    for _ in range(7):
        assert_error(*await post(svc, {"model": "small", "messages": Q, "llmo": {"skip_cache": True}}), 400,
                     "UPSTREAM_REJECTED_REQUEST", "messages")  # the upstream's `param` is carried through
    assert svc.backend.calls == {"small": 7}  # a refused request does not walk the fallback chain
    svc.backend.behaviours["small"] = "ok"
    status, _, answer = await post(svc, {"model": "small", "messages": Q}, key="key-b")
    assert status == 200 and answer["model"] == "small", answer
    assert svc.router.gateway.breakers.states()["primary"] == "closed"


async def test_the_cache_never_answers_a_request_with_other_sampling_parameters(svc: Harness) -> None:  # noqa: F811
    base = {"model": "small", "messages": Q}
    first = await post(svc, base)
    assert first[0] == 200 and svc.backend.calls["small"] == 1
    again = await post(svc, base)
    assert again[2]["llmo"]["cache_hit"] and svc.backend.calls["small"] == 1
    variants: list[dict[str, Any]] = [{"stop": ["N"]}, {"top_p": 0.5}, {"seed": 1}, {"top_k": 4},
                                      {"presence_penalty": 1.0}, {"frequency_penalty": 1.0}, {"temperature": 0.7}]
    for i, extra in enumerate(variants, start=2):
        status, _, answer = await post(svc, {**base, **extra})
        assert status == 200 and not answer["llmo"]["cache_hit"], extra
        assert svc.backend.calls["small"] == i, extra


async def test_bodies_are_bounded_and_an_oversized_prompt_is_a_client_error(svc: Harness) -> None:  # noqa: F811
    huge = json.dumps({"model": "small", "messages": [{"role": "user", "content": "a" * (5 * 1024 * 1024)}]}).encode()
    assert_error(*await post(svc, None, raw=huge), 413, "BODY_TOO_LARGE")
    # One 3 MB word: counted as the tokens it is, refused before any upstream call.
    word = {"model": "small", "messages": [{"role": "user", "content": "a" * (3 * 1024 * 1024)}]}
    assert_error(*await post(svc, word), 400, "CONTEXT_TOO_LONG")
    auto = {"model": "auto", "messages": [{"role": "user", "content": "word " * 20_000}]}
    assert_error(*await post(svc, auto), 400, "CONTEXT_TOO_LONG")
    assert svc.backend.calls == {}


BAD_INPUTS: list[tuple[str, bytes, str, str | None]] = [
    ("lone surrogate", b'{"model": "small", "messages": [{"role": "user", "content": "\\ud800x"}]}', "INVALID_UNICODE", "messages"),
    ("stream_options not an object", json.dumps({"messages": Q, "stream": True, "stream_options": "x"}).encode(),
     "INVALID_REQUEST", "stream_options"),
    ("deep nesting", b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", "INVALID_JSON", None),
    ("stop a number", json.dumps({"messages": Q, "stop": 5}).encode(), "INVALID_STOP", "stop"),
    ("n > 1", json.dumps({"messages": Q, "n": 1000}).encode(), "UNSUPPORTED_PARAMETER", "n"),
    ("strong_share out of range", json.dumps({"messages": Q, "llmo": {"strong_share": 5}}).encode(),
     "INVALID_STRONG_SHARE", "llmo.strong_share"),
    ("policy a number", json.dumps({"messages": Q, "llmo": {"policy": 42}}).encode(), "INVALID_REQUEST", "llmo.policy"),
    ("unknown policy", json.dumps({"messages": Q, "llmo": {"policy": "cheapest-ever"}}).encode(), "INVALID_POLICY", "policy"),
    ("temperature Infinity", b'{"messages": [{"role": "user", "content": "q"}], "temperature": Infinity}',
     "INVALID_SAMPLING_PARAMS", "temperature"),
    ("top_k huge", json.dumps({"messages": Q, "top_k": 2**31 - 1}).encode(), "INVALID_SAMPLING_PARAMS", "top_k"),
    ("penalty out of range", json.dumps({"messages": Q, "presence_penalty": 3}).encode(), "INVALID_SAMPLING_PARAMS",
     "presence_penalty"),
    ("tools", json.dumps({"messages": Q, "tools": [{"type": "function"}]}).encode(), "UNSUPPORTED_PARAMETER", "tools"),
    ("logprobs", json.dumps({"messages": Q, "logprobs": True}).encode(), "UNSUPPORTED_PARAMETER", "logprobs"),
    ("max_tokens a string", json.dumps({"messages": Q, "max_tokens": "9"}).encode(), "INVALID_REQUEST", "max_tokens"),
    ("max_tokens a bool", json.dumps({"messages": Q, "max_tokens": True}).encode(), "INVALID_REQUEST", "max_tokens"),
    ("messages not a list", json.dumps({"messages": "hi"}).encode(), "EMPTY_MESSAGES", "messages"),
    ("body an array", b"[]", "INVALID_JSON", None),
    ("not JSON", b"{nope", "INVALID_JSON", None),
    ("stream not a bool", json.dumps({"messages": Q, "stream": "yes"}).encode(), "INVALID_REQUEST", "stream"),
]


async def test_bad_input_is_a_json_400_naming_the_parameter(svc: Harness) -> None:  # noqa: F811
    for name, raw, code, param in BAD_INPUTS:
        status, headers, body = await post(svc, None, raw=raw)
        assert status == 400, (name, body)
        assert_error(status, headers, body, 400, code, param)
    assert svc.backend.calls == {}
    status, _, answer = await post(svc, {"model": "small", "messages": Q})  # still serving
    assert status == 200, answer


async def test_models_needs_a_key_and_errors_are_json(svc: Harness) -> None:  # noqa: F811
    url = f"http://127.0.0.1:{svc.router.http_port}/v1/models"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            assert resp.status == 401 and (await resp.json())["error"]["code"] == "API_KEY_MISSING"
        async with session.get(url.replace("/v1/models", "/v1/nope"), headers={"authorization": "Bearer key-a"}) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "ROUTE_NOT_FOUND"
