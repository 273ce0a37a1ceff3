"""OpenAI-compatible HTTP front: `POST /v1/chat/completions` (streaming or not) and
`GET /v1/models`, so an OpenAI-SDK application switches to the router by base URL.

`model` is a portfolio model name (explicit routing) or `auto` (the router decides).
LLMO extensions ride in an optional `llmo` object: `policy`, `experiment`, `strong_share`,
`max_prompt_tokens`, `compress_message_tokens`, `token_keep_ratio`, `skip_cache`, `prompt` ({template,
version, label, variables}) and `constraints` ({max_cost_micros, max_ttft_ms,
required_capabilities, min_quality}). Errors use OpenAI's error body with the LLMO reason
as `code` and the parameter at fault as `param`. Headers are only sent once the first token
is in hand, so a request that fails before any text gets a proper HTTP status, never a
broken stream. Sampling parameters are validated here and forwarded (`temperature`,
`top_p`, `top_k`, `seed`, `presence_penalty`, `frequency_penalty`, `stop`); those the
router cannot honour (`n` > 1, tools, logprobs, `response_format`, ...) are refused.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from llmo.core.errors import ServiceError, invalid_argument
from llmo.core.http_edge import (
    DEFAULT_MAX_BODY_BYTES,
    caller_of,
    edge_app,
    error_of,
    read_json,
)
from llmo.core.limits import MAX_LABEL_LEN, check_text
from llmo.core.logging import get_logger
from llmo.core.settings import PlatformSettings
from llmo.router import policies
from llmo.router.context import Message
from llmo.router.gateway import Delta, Finished, Gateway, GatewayEvent, GatewayRequest, PromptSpec, Started
from llmo.router.sampling import Sampling

log = get_logger(__name__)

AUTO_MODELS = frozenset({"auto", "llmo-auto", "router"})
# OpenAI parameters the router's one-choice, text-only answers cannot honour: refused,
# never silently dropped.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format",
               "logit_bias", "logprobs", "top_logprobs", "audio", "modalities", "prediction")
CLIENT_REQUEST_ID_HEADER = "x-client-request-id"


def _bad(field: str, message: str, reason: str = "INVALID_REQUEST") -> ServiceError:
    return invalid_argument(reason, message, field=field)


def _get(obj: dict[str, Any], key: str, kinds: tuple[type, ...], what: str, field: str = "") -> Any:
    """obj[key] when present and of one of `kinds` (bool is never a number), None when absent or null."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds:
        value = object()
    if not isinstance(value, kinds):
        raise _bad(field or key, f"{field or key} must be {what}")
    return value


def _number(obj: dict[str, Any], key: str, field: str = "") -> float | None:
    value = _get(obj, key, (int, float), "a number", field)
    return None if value is None else float(value)


def _strong_share(ext: dict[str, Any]) -> float | None:
    share = _number(ext, "strong_share", "llmo.strong_share")
    if share is not None and not (math.isfinite(share) and 0.0 <= share <= 1.0):
        raise invalid_argument("INVALID_STRONG_SHARE", "llmo.strong_share must be in [0, 1]", field="llmo.strong_share")
    return share


def _int(obj: dict[str, Any], key: str, field: str = "", *, minimum: int | None = 0) -> int | None:
    value = _get(obj, key, (int,), "an integer", field)
    if value is not None and minimum is not None and value < minimum:
        raise _bad(field or key, f"{field or key} must be >= {minimum}")
    return value  # type: ignore[no-any-return]


def _str(obj: dict[str, Any], key: str, field: str = "", max_len: int = MAX_LABEL_LEN) -> str:
    value = _get(obj, key, (str,), "a string", field)
    return check_text(value, field or key, max_len=max_len) if value is not None else ""


def _messages(body: dict[str, Any]) -> list[Message]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise invalid_argument("EMPTY_MESSAGES", "messages must be a non-empty array", field="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise invalid_argument("INVALID_ROLE", f"messages[{i}] needs a string role", field="messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            content = "".join(
                p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            )
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise _bad("messages", f"messages[{i}].content must be a string or an array of content parts")
        out.append(Message(m["role"], content))
    return out


def _sampling(body: dict[str, Any]) -> Sampling:
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(x, str) for x in stop):
        stops = tuple(stop)
    else:
        raise _bad("stop", "stop must be a string or an array of strings", "INVALID_STOP")
    return Sampling(
        temperature=_number(body, "temperature"),
        top_p=_number(body, "top_p"),
        top_k=_int(body, "top_k", minimum=None),
        seed=_int(body, "seed", minimum=None),
        presence_penalty=_number(body, "presence_penalty"),
        frequency_penalty=_number(body, "frequency_penalty"),
        stop=stops,
    ).check()


def _refuse_unsupported(body: dict[str, Any]) -> None:
    n = _int(body, "n", minimum=1)
    if n is not None and n != 1:
        raise invalid_argument(
            "UNSUPPORTED_PARAMETER", "the router returns one choice per request: n must be 1 (send n requests)", field="n"
        )
    for key in UNSUPPORTED:
        if body.get(key) not in (None, False):
            raise invalid_argument("UNSUPPORTED_PARAMETER", f"{key} is not supported by the router", field=key)


def parse_body(body: dict[str, Any], tenant: str, request_id: str) -> tuple[GatewayRequest, bool, bool]:
    """(request, stream, include_usage); raises INVALID_ARGUMENT naming the parameter."""
    messages = _messages(body)
    _refuse_unsupported(body)
    model = _str(body, "model") or "auto"
    ext = _get(body, "llmo", (dict,), "an object") or {}
    max_tokens = _int(body, "max_completion_tokens") if body.get("max_completion_tokens") is not None else _int(body, "max_tokens")
    stream = bool(_get(body, "stream", (bool,), "a boolean"))
    options = _get(body, "stream_options", (dict,), "an object") or {}
    include_usage = bool(_get(options, "include_usage", (bool,), "a boolean", "stream_options.include_usage"))
    prompt = None
    if ext.get("prompt") is not None:
        p = ext["prompt"]
        if not isinstance(p, dict) or not isinstance(p.get("template"), str):
            raise _bad("llmo.prompt", "llmo.prompt needs a template name")
        variables = _get(p, "variables", (dict,), "an object", "llmo.prompt.variables") or {}
        if not all(isinstance(v, str) for v in variables.values()):
            raise _bad("llmo.prompt.variables", "llmo.prompt.variables must map names to strings")
        prompt = PromptSpec(
            p["template"], _int(p, "version", "llmo.prompt.version") or 0, _str(p, "label", "llmo.prompt.label"), variables
        )
    c = _get(ext, "constraints", (dict,), "an object", "llmo.constraints") or {}
    capabilities = c.get("required_capabilities") or []
    if not isinstance(capabilities, list) or not all(isinstance(x, str) for x in capabilities):
        raise _bad("llmo.constraints.required_capabilities", "required_capabilities must be an array of strings")
    constraints = policies.Constraints(
        max_cost_micros=_int(c, "max_cost_micros", "llmo.constraints.max_cost_micros") or 0,
        max_ttft_ms=_number(c, "max_ttft_ms", "llmo.constraints.max_ttft_ms") or 0.0,
        required_capabilities=frozenset(capabilities),
        min_quality=_number(c, "min_quality", "llmo.constraints.min_quality") or 0.0,
    )
    req = GatewayRequest(
        tenant=tenant,
        messages=messages,
        prompt=prompt,
        policy=_str(ext, "policy", "llmo.policy"),
        model="" if model in AUTO_MODELS else model,
        constraints=constraints,
        strong_share=_strong_share(ext),
        max_prompt_tokens=_int(ext, "max_prompt_tokens", "llmo.max_prompt_tokens") or 0,
        compress_message_tokens=_int(ext, "compress_message_tokens", "llmo.compress_message_tokens") or 0,
        token_keep_ratio=_number(ext, "token_keep_ratio", "llmo.token_keep_ratio") or 0.0,
        max_tokens=max_tokens or 0,
        sampling=_sampling(body),
        experiment=_str(ext, "experiment", "llmo.experiment"),
        user=_str(body, "user"),
        application=_str(ext, "application", "llmo.application"),
        skip_cache=bool(_get(ext, "skip_cache", (bool,), "a boolean", "llmo.skip_cache")),
        request_id=request_id,
        stream=stream,
    )
    return req, stream, include_usage


class OpenAIFront:
    def __init__(self, gateway: Gateway, platform: PlatformSettings, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.gw = gateway
        self.platform = platform
        self.max_body_bytes = max_body_bytes
        self._tasks: set[asyncio.Task[None]] = set()

    def routes(self) -> list[web.RouteDef]:
        """The OpenAI routes, for an app behind the shared edge (`llmo.core.http_edge`), which
        authenticates (resolving the end tenant and minting the request id: a client's
        x-request-id is never the exactly-once key of its usage), bounds the body (413), and
        turns every error, expected or not, into a JSON body."""
        return [web.post("/v1/chat/completions", self.chat), web.get("/v1/models", self.models)]

    def app(self) -> web.Application:
        """A stand-alone app with the edge and these routes (the service gets its app from the kit)."""
        app = edge_app("router", self.platform, max_body_bytes=self.max_body_bytes)
        app.add_routes(self.routes())
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

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": "auto", "object": "model", "owned_by": "llmo-router"}]
        data += [{"id": m.name, "object": "model", "owned_by": m.provider} for m in self.gw.portfolio.models]
        return web.json_response({"object": "list", "data": data})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        caller = caller_of(request)
        request_id = caller.request_id
        body = await read_json(request)
        req, stream, include_usage = parse_body(body, caller.tenant, request_id)
        events = self.gw.complete(req)
        if stream:
            return await self._stream(request, events, request_id, include_usage, caller.client_request_id)
        response = await self._unary(events, request_id)
        if caller.client_request_id:
            response.headers[CLIENT_REQUEST_ID_HEADER] = caller.client_request_id
        return response

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
        self,
        request: web.Request,
        events: AsyncIterator[GatewayEvent],
        request_id: str,
        include_usage: bool,
        client_request_id: str,
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
            headers = {"content-type": "text/event-stream", "cache-control": "no-cache", "x-request-id": request_id}
            if client_request_id:
                headers[CLIENT_REQUEST_ID_HEADER] = client_request_id
            r = web.StreamResponse(headers=headers)
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
            _, payload = error_of(err)
            await resp.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        assert resp is not None
        if not done:
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        return resp


def _usage(fin: Finished) -> dict[str, Any]:
    return {
        "prompt_tokens": fin.usage.prompt_tokens,
        "completion_tokens": fin.usage.completion_tokens,
        "total_tokens": fin.usage.prompt_tokens + fin.usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": fin.usage.cached_tokens},
    }

