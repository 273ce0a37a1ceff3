"""OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions) with SSE streaming."""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmo.core import context as ctx
from llmo.core.errors import ServiceError, invalid_argument
from llmo.core.http_edge import (
    DEFAULT_MAX_BODY_BYTES,
    PUBLIC_PATHS,
    caller_of,
    edge_app,
    error_of,
    error_payload,
    read_json,
)
from llmo.core.limits import MAX_LABEL_LEN, check_text, preview
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

APPLICATION_HEADER = "x-llmo-application"
# OpenAI parameters this server does not implement: a request that sets one gets a 400 naming it
# rather than an answer that silently ignores it.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias", "suffix",
               "parallel_tool_calls", "modalities", "audio", "prediction", "best_of")
_KIND_NAME = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", dict: "an object",
              list: "a list"}


def _bad(key: str, message: str) -> ServiceError:
    return invalid_argument("INVALID_SAMPLING_PARAMS", message, field=key)


def _field(body: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    """`body[key]` checked to be of `kind` (an int is a valid float, a bool is never a number)."""
    value = body.get(key)
    if value is None:
        return default
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise _bad(key, f"{key} must be {_KIND_NAME[kind]}, not {type(value).__name__}")
    return value


def _int_list(body: dict[str, Any], key: str) -> list[int]:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(type(t) is int for t in value):
        raise _bad(key, f"{key} must be a list of integers")
    return value


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("stop", "stop must be a string or a list of strings")
    return stop


def _check_supported(body: dict[str, Any]) -> None:
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key):
            raise _bad(key, f"{key} is not supported; use repetition_penalty")
    for key in UNSUPPORTED:
        value = body.get(key)
        if value is not None and value != [] and value != {} and not (key == "best_of" and value == 1):
            raise invalid_argument("UNSUPPORTED_PARAMETER", f"{key} is not supported by this server", field=key)


def sampling_from_body(body: dict[str, Any], chat: bool) -> tuple[SamplingParams, dict[str, str]]:
    """The request's sampling parameters (types checked here, ranges in `check_sampling`) and the names
    of the body fields they came from, for the error `param`."""
    _check_supported(body)
    names: dict[str, str] = {}
    if chat:
        logprobs = _field(body, "top_logprobs", int, 0) if _field(body, "logprobs", bool, False) else None
        names["logprobs"] = "top_logprobs"
        max_tokens = _field(body, "max_completion_tokens", int, None)
        if max_tokens is None:
            max_tokens = _field(body, "max_tokens", int, 16)
        else:
            names["max_tokens"] = "max_completion_tokens"
    else:
        logprobs = _field(body, "logprobs", int, None)
        max_tokens = _field(body, "max_tokens", int, 16)
    prompt_logprobs: int | None = None
    if not chat and _field(body, "echo", bool, False):
        # echo + logprobs: the prompt tokens' logprobs come first; max_tokens 0 echoes the prompt only.
        prompt_logprobs = logprobs if logprobs is not None else (0 if max_tokens == 0 else None)
        names["prompt_logprobs"] = "logprobs"
    elif max_tokens == 0:
        raise _bad("max_tokens", "max_tokens must be >= 1 (0 only with echo)")
    params = SamplingParams(
        max_tokens=max_tokens, temperature=_field(body, "temperature", float, 1.0),
        top_p=_field(body, "top_p", float, 1.0), top_k=_field(body, "top_k", int, 0),
        seed=_field(body, "seed", int, None),
        repetition_penalty=_field(body, "repetition_penalty", float, 1.0), stop=_stop(body),
        stop_token_ids=_int_list(body, "stop_token_ids"), ignore_eos=_field(body, "ignore_eos", bool, False),
        n=_field(body, "n", int, 1), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
    )
    return params, names


def _include_usage(body: dict[str, Any]) -> bool:
    options = _field(body, "stream_options", dict, {})
    include = options.get("include_usage")
    if include is not None and type(include) is not bool:
        raise _bad("stream_options", "stream_options.include_usage must be a boolean")
    return bool(include)


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


def _request_id() -> str:
    """The edge's id of this call: minted, or the trusted `x-request-id` of a service key (the event's
    request id, so the ledger can join it with the caller's own event)."""
    request_id = ctx.current_request_id()
    assert request_id, "the HTTP edge binds a request id to every call"
    return request_id


def _message(m: Any) -> dict[str, str]:
    role = m.get("role") if isinstance(m, dict) else None
    content = m.get("content") if isinstance(m, dict) else None
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise invalid_argument("PROMPT_MISSING", "message content parts must be text parts "
                                   "({\"type\": \"text\", \"text\": ...}); other parts are not supported",
                                   field="messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(role, str) or not isinstance(content, str):
        raise invalid_argument("PROMPT_MISSING", "each message needs a string role and content", field="messages")
    check_text(role, "messages.role", max_len=MAX_LABEL_LEN, reason="PROMPT_MISSING")
    return {"role": role, "content": content}


# Paths that need no API key: the edge's health routes and vLLM's /health and /metrics.
PUBLIC = PUBLIC_PATHS | {"/health"}


class OpenAIApp:
    """The HTTP app. The shared edge (`llmo.core.http_edge`) authenticates, resolves the tenant (the end
    tenant when a service key acts for one) and the request id, bounds the body and turns every error into
    the JSON error body; the handlers here only speak OpenAI."""

    def __init__(self, service: InferenceService, platform: PlatformSettings, *,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.service = service
        self.platform = platform
        self.max_body_bytes = max_body_bytes

    def routes(self) -> list[web.RouteDef]:
        """The OpenAI routes, plus vLLM's `/health` and `/metrics` (public, see PUBLIC)."""
        return [
            web.get("/v1/models", self.list_models),
            web.get("/v1/models/{model:.+}", self.get_model),
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics),
        ]

    @functools.cached_property
    def app(self) -> web.Application:
        """A stand-alone app with the edge and these routes (the service gets its app from the kit)."""
        app = edge_app("inference", self.platform, max_body_bytes=self.max_body_bytes, public_paths=PUBLIC)
        app.add_routes(self.routes())
        return app

    @staticmethod
    def _caller(request: web.Request, body: dict[str, Any]) -> Caller:
        user = _field(body, "user", str, "")
        return Caller(caller_of(request).tenant, request.headers.get(APPLICATION_HEADER, ""), user)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        metrics.refresh_gauges(self.service.registry)
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _model_json(self, model_id: str) -> dict[str, Any]:
        backend, adapter = self.service.registry.resolve(model_id)
        info = backend.info()
        entry = {"id": adapter or info.model_id, "object": "model", "created": 0, "owned_by": "llmo",
                 "engine": info.engine, "context_length": info.context_length, "quantization": info.quantization}
        found = self.service.registry.find_adapter(adapter) if adapter else None
        if found is not None:
            handle = found[1]
            # as vLLM lists LoRA adapters: `parent` is the base model's id
            entry.update(created=int(handle.loaded_at), parent=info.model_id, lora_rank=handle.rank)
        return entry

    async def list_models(self, request: web.Request) -> web.Response:
        registry = self.service.registry
        ids = registry.ids() + [handle.name for _, handle in registry.adapters()]
        return web.json_response({"object": "list", "data": [self._model_json(m) for m in ids]})

    async def get_model(self, request: web.Request) -> web.Response:
        return web.json_response(self._model_json(request.match_info["model"]))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        caller = self._caller(request, body)
        params, names = sampling_from_body(body, chat=False)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        gen = GenerationRequest(request_id=_request_id(), params=params, priority=_field(body, "priority", int, 0))
        if isinstance(prompt, str):
            gen.prompt = prompt
        elif isinstance(prompt, list) and all(type(t) is int for t in prompt):
            gen.prompt_token_ids = prompt
        else:
            raise invalid_argument("PROMPT_MISSING", "prompt must be a string or a list of token ids",
                                   field="prompt")
        echo: str | None = None
        if body.get("echo"):
            if gen.prompt is None:
                raise invalid_argument("INVALID_SAMPLING_PARAMS", "echo needs a string prompt", field="echo")
            echo = gen.prompt
        return await self._respond(request, body, gen, caller, names, chat=False, echo=echo)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        caller = self._caller(request, body)
        params, names = sampling_from_body(body, chat=True)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise invalid_argument("PROMPT_MISSING", "messages must be a non-empty list", field="messages")
        gen = GenerationRequest(request_id=_request_id(), params=params, messages=[_message(m) for m in messages],
                                priority=_field(body, "priority", int, 0))
        return await self._respond(request, body, gen, caller, names, chat=True)

    async def _respond(self, request: web.Request, body: dict[str, Any], gen: GenerationRequest, caller: Caller,
                       names: dict[str, str], chat: bool, echo: str | None = None) -> web.StreamResponse:
        """`echo`: the prompt text to put before each completion (with its logprobs when they were asked for);
        `names`: the body fields the sampling parameters came from (for the error `param`)."""
        model = _field(body, "model", str, "")
        streaming = _field(body, "stream", bool, False)
        include_usage = _include_usage(body)
        backend, adapter = self.service.registry.resolve(model)
        stream = self.service.generate(model, gen, caller, names)
        prefix = "chatcmpl" if chat else "cmpl"
        base = {"id": f"{prefix}-{gen.request_id}", "created": int(time.time()), "model": adapter or backend.model_id}
        if streaming:
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

    async def _stream(self, request: web.Request, stream: AsyncGenerator[GenerationChunk, None], base: dict[str, Any],
                      chat: bool, include_usage: bool, n: int, echo: str | None = None,
                      want_logprobs: bool = False) -> web.StreamResponse:
        obj = "chat.completion.chunk" if chat else "text_completion"
        # Fail before the 200 goes out when the request is rejected outright (bad length, queue full).
        first: GenerationChunk | None = None
        async with contextlib.aclosing(stream):
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
                # The 200 is out: the error goes in the stream, with the body an unstreamed call would get.
                await send(error_of(exc)[1])
            except ConnectionResetError:
                log.info("client went away; request aborted", request_id=base["id"])
                return response
            except Exception as exc:
                log.exception("stream failed", error=preview(str(exc), 200))
                request_id = ctx.current_request_id()
                await send(error_payload(500, f"internal error (request id {request_id})", "INTERNAL"))
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
