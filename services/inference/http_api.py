"""OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions) with SSE streaming."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmo.core.auth import tenant_for
from llmo.core.errors import ServiceError, invalid_argument
from llmo.core.logging import get_logger
from llmo.core.settings import PlatformSettings
from llmo.inference import metrics
from llmo.inference.backends.base import (
    ChoiceChunk,
    GenerationChunk,
    GenerationRequest,
    PromptTokenInfo,
    TokenInfo,
    Usage,
)
from llmo.inference.engine.params import SamplingParams
from llmo.inference.service import Caller, InferenceService

log = get_logger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 429: "rate_limit_error"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": param,
                      "code": code}}


def _service_error_response(exc: ServiceError) -> web.Response:
    status = HTTP_STATUS.get(exc.code, 500)
    return web.json_response(error_body(status, exc.message, exc.reason, exc.metadata.get("field")), status=status)


def _number(body: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise invalid_argument("INVALID_SAMPLING_PARAMS", f"{key} must be a {kind.__name__}", field=key)
    return value


def sampling_from_body(body: dict[str, Any], chat: bool) -> SamplingParams:
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key):
            raise invalid_argument("INVALID_SAMPLING_PARAMS", f"{key} is not supported; use repetition_penalty",
                                   field=key)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise invalid_argument("INVALID_SAMPLING_PARAMS", "stop must be a string or a list of strings", field="stop")
    if chat:
        logprobs = _number(body, "top_logprobs", int, 0) if body.get("logprobs") else None
        max_tokens = _number(body, "max_completion_tokens", int, None) or _number(body, "max_tokens", int, 16)
    else:
        logprobs = _number(body, "logprobs", int, None)
        max_tokens = _number(body, "max_tokens", int, 16)
    prompt_logprobs: int | None = None
    if not chat and body.get("echo"):
        # echo + logprobs: the prompt tokens' logprobs come first; max_tokens 0 echoes the prompt only.
        prompt_logprobs = logprobs if logprobs is not None else (0 if max_tokens == 0 else None)
    elif max_tokens == 0:
        raise invalid_argument("INVALID_SAMPLING_PARAMS", "max_tokens must be >= 1 (0 only with echo)",
                               field="max_tokens")
    params = SamplingParams(
        max_tokens=max_tokens, temperature=_number(body, "temperature", float, 1.0),
        top_p=_number(body, "top_p", float, 1.0), top_k=_number(body, "top_k", int, 0),
        seed=_number(body, "seed", int, None),
        repetition_penalty=_number(body, "repetition_penalty", float, 1.0), stop=stop,
        stop_token_ids=list(body.get("stop_token_ids") or []), ignore_eos=bool(body.get("ignore_eos", False)),
        n=_number(body, "n", int, 1), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
    )
    try:
        params.validate()
    except ValueError as exc:
        raise invalid_argument("INVALID_SAMPLING_PARAMS", str(exc), field=str(exc).split(" ", 1)[0]) from exc
    return params


def _usage(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _chat_logprobs(infos: list[TokenInfo]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [
        {**entry(t.token, t.logprob), "top_logprobs": [entry(s, v) for _, s, v in t.top]} for t in infos
    ]}


def _text_offsets(tokens: list[str], offset: int) -> list[int]:
    """Where each token starts in the returned text (OpenAI's `text_offset`)."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return offsets


def _completion_logprobs(infos: list[TokenInfo], offset: int) -> dict[str, Any]:
    tokens = [t.token for t in infos]
    return {"tokens": tokens, "token_logprobs": [t.logprob for t in infos],
            "top_logprobs": [{s: v for _, s, v in t.top} for t in infos], "text_offset": _text_offsets(tokens, offset)}


def _echo_logprobs(prompt: list[PromptTokenInfo]) -> dict[str, Any]:
    """OpenAI's completion logprobs of the prompt tokens (echo): the first token has null logprobs."""
    tokens = [p.token for p in prompt]
    return {"tokens": tokens, "token_logprobs": [p.logprob for p in prompt],
            "top_logprobs": [None if p.logprob is None else {s: v for _, s, v in p.top} for p in prompt],
            "text_offset": _text_offsets(tokens, 0)}


def _joined(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    return {key: first[key] + second[key] for key in first}


class OpenAIApp:
    def __init__(self, service: InferenceService, platform: PlatformSettings) -> None:
        self.service = service
        self.platform = platform
        self.app = web.Application(middlewares=[self._errors])
        self.app.add_routes([
            web.get("/v1/models", self.list_models),
            web.get("/v1/models/{model:.+}", self.get_model),
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics),
        ])

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ServiceError as exc:
            return _service_error_response(exc)
        except web.HTTPException as exc:
            if exc.status >= 400:
                return web.json_response(error_body(exc.status, exc.reason, "HTTP_ERROR"), status=exc.status)
            raise
        except Exception:
            log.exception("http handler failed", path=request.path)
            return web.json_response(error_body(500, "internal error", "INTERNAL"), status=500)

    def _caller(self, request: web.Request, body: dict[str, Any] | None = None) -> Caller:
        headers = {k.lower(): v for k, v in request.headers.items()}
        tenant = tenant_for(headers, self.platform.api_keys, default_tenant=self.platform.default_tenant)
        user = str((body or {}).get("user") or "")
        return Caller(tenant, headers.get("x-llmo-application", ""), user)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        metrics.refresh_gauges(self.service.registry)
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _model_json(self, model_id: str) -> dict[str, Any]:
        info = self.service.registry.get(model_id).info()
        return {"id": info.model_id, "object": "model", "created": 0, "owned_by": "llmo",
                "engine": info.engine, "context_length": info.context_length, "quantization": info.quantization}

    async def list_models(self, request: web.Request) -> web.Response:
        self._caller(request)
        return web.json_response({"object": "list",
                                  "data": [self._model_json(m) for m in self.service.registry.ids()]})

    async def get_model(self, request: web.Request) -> web.Response:
        self._caller(request)
        return web.json_response(self._model_json(request.match_info["model"]))

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise invalid_argument("INVALID_JSON", f"request body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise invalid_argument("INVALID_JSON", "request body must be a JSON object")
        return body

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        caller = self._caller(request, body)
        params = sampling_from_body(body, chat=False)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        gen = GenerationRequest(request_id=self._request_id(request, "cmpl"), params=params,
                                priority=_number(body, "priority", int, 0))
        if isinstance(prompt, str):
            gen.prompt = prompt
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            gen.prompt_token_ids = prompt
        else:
            raise invalid_argument("PROMPT_MISSING", "prompt must be a string or a list of token ids",
                                   field="prompt")
        echo: str | None = None
        if body.get("echo"):
            if gen.prompt is None:
                raise invalid_argument("INVALID_SAMPLING_PARAMS", "echo needs a string prompt", field="echo")
            echo = gen.prompt
        return await self._respond(request, body, gen, caller, chat=False, echo=echo)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        caller = self._caller(request, body)
        params = sampling_from_body(body, chat=True)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise invalid_argument("PROMPT_MISSING", "messages must be a non-empty list", field="messages")
        clean = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
                raise invalid_argument("PROMPT_MISSING", "each message needs a string role and content",
                                       field="messages")
            clean.append({"role": m["role"], "content": content})
        gen = GenerationRequest(request_id=self._request_id(request, "chatcmpl"), params=params, messages=clean,
                                priority=_number(body, "priority", int, 0))
        return await self._respond(request, body, gen, caller, chat=True)

    @staticmethod
    def _request_id(request: web.Request, prefix: str) -> str:
        return request.headers.get("x-request-id") or f"{prefix}-{uuid.uuid4().hex}"

    async def _respond(self, request: web.Request, body: dict[str, Any], gen: GenerationRequest, caller: Caller,
                       chat: bool, echo: str | None = None) -> web.StreamResponse:
        """`echo`: the prompt text to put before each completion (with its logprobs when they were asked for)."""
        model = str(body.get("model") or "")
        backend = self.service.registry.get(model)
        stream = self.service.generate(model, gen, caller)
        base = {"id": gen.request_id, "created": int(time.time()), "model": backend.model_id}
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self._stream(request, stream, base, chat, include_usage, gen.params.n, echo,
                                      gen.params.logprobs is not None)
        async with contextlib.aclosing(stream):
            chunks = [chunk async for chunk in stream]
        return web.json_response(self._aggregate(chunks, base, chat, gen.params.n, echo,
                                                 gen.params.logprobs is not None))

    def _aggregate(self, chunks: list[GenerationChunk], base: dict[str, Any], chat: bool, n: int,
                   echo: str | None = None, want_logprobs: bool = False) -> dict[str, Any]:
        texts = [""] * n
        infos: list[list[TokenInfo]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        prompt: list[PromptTokenInfo] = []
        usage = Usage()
        for chunk in chunks:
            for c in chunk.choices:
                texts[c.index] += c.text
                infos[c.index].extend(c.logprobs)
                finish[c.index] = c.finish_reason or finish[c.index]
            usage = chunk.usage or usage
            prompt = chunk.prompt_logprobs or prompt
        want_logprobs = want_logprobs or any(infos)
        choices: list[dict[str, Any]] = []
        for i in range(n):
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                                "logprobs": _chat_logprobs(infos[i]) if want_logprobs else None,
                                "finish_reason": finish[i]})
            else:
                logprobs = _completion_logprobs(infos[i], len(echo or "")) if want_logprobs else None
                if logprobs is not None and echo is not None:
                    logprobs = _joined(_echo_logprobs(prompt), logprobs)
                choices.append({"index": i, "text": (echo or "") + texts[i], "logprobs": logprobs,
                                "finish_reason": finish[i]})
        return {**base, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": _usage(usage)}

    async def _stream(self, request: web.Request, stream: AsyncIterator[GenerationChunk], base: dict[str, Any],
                      chat: bool, include_usage: bool, n: int, echo: str | None = None,
                      want_logprobs: bool = False) -> web.StreamResponse:
        obj = "chat.completion.chunk" if chat else "text_completion"
        # Fail before the 200 goes out when the request is rejected outright (bad length, queue full).
        first: GenerationChunk | None = None
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                first = None
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)

            async def send(payload: dict[str, Any] | str) -> None:
                data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
                await response.write(f"data: {data}\n\n".encode())

            if chat:
                for i in range(n):
                    await send({**base, "object": obj, "choices": [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}]})
            offsets = [0] * n
            if echo is not None:  # the prompt (and its logprobs) first, as its own event per choice
                prompt = first.prompt_logprobs if first is not None and want_logprobs else None
                await send({**base, "object": obj, "choices": [
                    {"index": i, "text": echo, "logprobs": _echo_logprobs(prompt) if prompt else None,
                     "finish_reason": None} for i in range(n)]})
                offsets = [len(echo)] * n
            usage: Usage | None = None
            try:
                chunk = first
                while chunk is not None:
                    choices = [self._choice_delta(c, chat, offsets) for c in chunk.choices]
                    if choices:
                        await send({**base, "object": obj, "choices": choices})
                    usage = chunk.usage or usage
                    chunk = await anext(stream, None)
            except ServiceError as exc:
                status = HTTP_STATUS.get(exc.code, 500)
                await send(error_body(status, exc.message, exc.reason))
            except ConnectionResetError:
                log.info("client went away; request aborted", request_id=base["id"])
                return response
            if include_usage and usage is not None:
                await send({**base, "object": obj, "choices": [], "usage": _usage(usage)})
            await send("[DONE]")
            await response.write_eof()
            return response

    @staticmethod
    def _choice_delta(c: ChoiceChunk, chat: bool, offsets: list[int]) -> dict[str, Any]:
        if chat:
            return {"index": c.index, "delta": {"content": c.text} if c.text else {},
                    "logprobs": _chat_logprobs(c.logprobs) if c.logprobs else None, "finish_reason": c.finish_reason}
        out = {"index": c.index, "text": c.text,
               "logprobs": _completion_logprobs(c.logprobs, offsets[c.index]) if c.logprobs else None,
               "finish_reason": c.finish_reason}
        offsets[c.index] += len(c.text)
        return out
