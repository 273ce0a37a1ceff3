"""OpenAI-compatible HTTP front: `POST /v1/chat/completions` (streaming or not) and
`GET /v1/models`, so an OpenAI-SDK application switches to the router by base URL.

`model` is a portfolio model name (explicit routing) or `auto` (the router decides).
LLMO extensions ride in an optional `llmo` object: `policy`, `experiment`, `strong_share`,
`max_prompt_tokens`, `compress_message_tokens`, `token_keep_ratio`, `skip_cache`, `prompt` ({template,
version, label, variables}) and `constraints` ({max_cost_micros, max_ttft_ms,
required_capabilities, min_quality}). Errors use OpenAI's error body with the LLMO reason
as `code`. Headers are only sent once the first token is in hand, so a request that fails
before any text gets a proper HTTP status, never a broken stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from aiohttp import web

from llmo.core.auth import tenant_for
from llmo.core.errors import ServiceError, invalid_argument
from llmo.core.logging import get_logger
from llmo.core.settings import PlatformSettings
from llmo.router import policies
from llmo.router.context import Message
from llmo.router.gateway import Delta, Finished, Gateway, GatewayEvent, GatewayRequest, PromptSpec, Started

log = get_logger(__name__)

AUTO_MODELS = frozenset({"auto", "llmo-auto", "router"})
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}
_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


def error_body(err: ServiceError) -> tuple[int, dict[str, Any]]:
    status = _HTTP_STATUS.get(err.code, 500)
    return status, {
        "error": {
            "message": err.message,
            "type": _ERROR_TYPE.get(status, "api_error"),
            "code": err.reason,
            "param": None,
            "metadata": err.metadata,
        }
    }


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid_argument("INVALID_REQUEST", f"{what} must be an object")
    return {str(k): str(v) for k, v in value.items()}


def parse_body(body: Any, tenant: str, request_id: str) -> tuple[GatewayRequest, bool, bool]:
    """(request, stream, include_usage)."""
    if not isinstance(body, dict):
        raise invalid_argument("INVALID_REQUEST", "the request body must be a JSON object")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise invalid_argument("EMPTY_MESSAGES", "messages must be a non-empty array")
    messages = []
    for i, m in enumerate(raw_messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise invalid_argument("INVALID_ROLE", f"messages[{i}] needs a string role")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise invalid_argument("INVALID_REQUEST", f"messages[{i}].content must be a string")
        messages.append(Message(m["role"], content))
    model = body.get("model") or "auto"
    if not isinstance(model, str):
        raise invalid_argument("UNKNOWN_MODEL", "model must be a string")
    ext = body.get("llmo") or {}
    if not isinstance(ext, dict):
        raise invalid_argument("INVALID_REQUEST", "llmo must be an object")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or 0
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise invalid_argument("INVALID_MAX_TOKENS", "max_tokens must be a non-negative integer")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    prompt = None
    if ext.get("prompt"):
        p = ext["prompt"]
        if not isinstance(p, dict) or not isinstance(p.get("template"), str):
            raise invalid_argument("INVALID_REQUEST", "llmo.prompt needs a template name")
        prompt = PromptSpec(p["template"], int(p.get("version", 0)), str(p.get("label", "")), _str_map(p.get("variables"), "llmo.prompt.variables"))
    c = ext.get("constraints") or {}
    try:
        constraints = policies.Constraints(
            max_cost_micros=int(c.get("max_cost_micros", 0)),
            max_ttft_ms=float(c.get("max_ttft_ms", 0.0)),
            required_capabilities=frozenset(c.get("required_capabilities", [])),
            min_quality=float(c.get("min_quality", 0.0)),
        )
        temperature = None if body.get("temperature") is None else float(body["temperature"])
        top_p = None if body.get("top_p") is None else float(body["top_p"])
        strong_share = None if ext.get("strong_share") is None else float(ext["strong_share"])
    except (TypeError, ValueError, AttributeError) as exc:
        raise invalid_argument("INVALID_REQUEST", f"invalid numeric field: {exc}") from exc
    stream = bool(body.get("stream", False))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
    req = GatewayRequest(
        tenant=tenant,
        messages=messages,
        prompt=prompt,
        policy=str(ext.get("policy", "")),
        model="" if model in AUTO_MODELS else model,
        constraints=constraints,
        strong_share=strong_share,
        max_prompt_tokens=int(ext.get("max_prompt_tokens", 0)),
        compress_message_tokens=int(ext.get("compress_message_tokens", 0)),
        token_keep_ratio=float(ext.get("token_keep_ratio", 0.0)),
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=[str(s) for s in stop],
        experiment=str(ext.get("experiment", "")),
        user=str(body.get("user", "")),
        application=str(ext.get("application", "")),
        skip_cache=bool(ext.get("skip_cache", False)),
        request_id=request_id,
        stream=bool(body.get("stream", False)),
    )
    return req, stream, include_usage


class OpenAIFront:
    def __init__(self, gateway: Gateway, platform: PlatformSettings) -> None:
        self.gw = gateway
        self.platform = platform
        self._tasks: set[asyncio.Task[None]] = set()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/healthz", self.health)
        return app

    def _background(self, events: AsyncIterator[GatewayEvent]) -> None:
        async def drain() -> None:
            try:
                async for _ in events:
                    pass
            except ServiceError as err:
                log.warning("router.bookkeeping_failed", reason=err.reason)

        task = asyncio.create_task(drain())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def _tenant(self, request: web.Request) -> str:
        return tenant_for(
            {"authorization": request.headers.get("Authorization", "")},
            self.platform.api_keys,
            default_tenant=self.platform.default_tenant,
        )

    async def models(self, request: web.Request) -> web.Response:
        try:
            self._tenant(request)
        except ServiceError as err:
            status, body = error_body(err)
            return web.json_response(body, status=status)
        data = [{"id": "auto", "object": "model", "owned_by": "llmo-router"}]
        data += [{"id": m.name, "object": "model", "owned_by": m.provider} for m in self.gw.portfolio.models]
        return web.json_response({"object": "list", "data": data})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        request_id = request.headers.get("x-request-id") or f"chatcmpl-{_rand()}"
        try:
            tenant = self._tenant(request)
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise invalid_argument("INVALID_JSON", f"the request body is not JSON: {exc}") from exc
            req, stream, include_usage = parse_body(body, tenant, request_id)
            events = self.gw.complete(req)
            if stream:
                return await self._stream(request, events, request_id, include_usage)
            return await self._unary(events, request_id)
        except ServiceError as err:
            status, payload = error_body(err)
            return web.json_response(payload, status=status)

    async def _unary(self, events: AsyncIterator[GatewayEvent], request_id: str) -> web.Response:
        text: list[str] = []
        fin: Finished | None = None
        async for ev in events:
            if isinstance(ev, Delta):
                text.append(ev.text)
            elif isinstance(ev, Finished):
                fin = ev
                break
        assert fin is not None
        # Answer now; the gateway's bookkeeping (cache, request log, events) finishes in the background.
        self._background(events)
        return web.json_response(
            {
                "id": request_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": fin.model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "finish_reason": fin.finish_reason}
                ],
                "usage": _usage(fin),
                "llmo": {"cache_hit": fin.cache_hit, "fallbacks": fin.fallbacks, "cost_micros": fin.cost_micros},
            }
        )

    async def _stream(
        self, request: web.Request, events: AsyncIterator[GatewayEvent], request_id: str, include_usage: bool
    ) -> web.StreamResponse:
        created = int(time.time())
        resp: web.StreamResponse | None = None
        model = ""
        done = False

        def chunk(delta: dict[str, Any], finish: str | None, extra: dict[str, Any] | None = None) -> bytes:
            payload: dict[str, Any] = {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if extra:
                payload.update(extra)
            return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

        async def open_stream() -> web.StreamResponse:
            r = web.StreamResponse(
                headers={"content-type": "text/event-stream", "cache-control": "no-cache", "x-request-id": request_id}
            )
            await r.prepare(request)
            await r.write(chunk({"role": "assistant", "content": ""}, None))
            return r

        try:
            async for ev in events:
                if isinstance(ev, Started):
                    model = ev.decision.model.name
                elif isinstance(ev, Delta):
                    if resp is None:
                        resp = await open_stream()
                    await resp.write(chunk({"content": ev.text}, None))
                elif isinstance(ev, Finished):
                    model = ev.model
                    if resp is None:
                        resp = await open_stream()
                    await resp.write(chunk({}, ev.finish_reason))
                    if include_usage:
                        payload = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": _usage(ev)}
                        await resp.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
                    # The client has everything: end its stream now; the gateway's
                    # bookkeeping (cache, request log, events) finishes after.
                    await resp.write(b"data: [DONE]\n\n")
                    await resp.write_eof()
                    done = True
        except ServiceError as err:
            if resp is None:
                raise
            # Text was already sent and no fallback could finish it: end the stream with an
            # OpenAI error event rather than cutting the connection.
            _, payload = error_body(err)
            await resp.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        assert resp is not None
        if not done:
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        return resp


def _usage(fin: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": fin.usage.prompt_tokens,
        "completion_tokens": fin.usage.completion_tokens,
        "total_tokens": fin.usage.prompt_tokens + fin.usage.completion_tokens,
    }


def _rand() -> str:
    import secrets

    return secrets.token_hex(12)
