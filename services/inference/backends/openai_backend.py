"""Any OpenAI-compatible server (vLLM, TensorRT-LLM, SGLang, a paid API) behind our API."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from llmo.core.errors import (
    ServiceError,
    failed_precondition,
    invalid_argument,
    not_found,
    resource_exhausted,
    unavailable,
)
from llmo.inference.backends.base import (
    ChoiceChunk,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    Timings,
    TokenInfo,
    Usage,
)
from llmo.inference.engine.params import SamplingParams


def _upstream_error(status: int, text: str) -> ServiceError:
    try:
        message = str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = text[:500]
    detail = f"upstream server answered {status}: {message}"
    if status in (400, 422):
        return invalid_argument("INVALID_SAMPLING_PARAMS", detail, upstream_status=status)
    if status == 404:
        return not_found("MODEL_NOT_FOUND", detail, upstream_status=status)
    if status == 429:
        return resource_exhausted("QUEUE_FULL", detail, upstream_status=status)
    return unavailable("BACKEND_UNAVAILABLE", detail, backend="openai", upstream_status=status)


def _body_params(params: SamplingParams, chat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": params.max_tokens, "temperature": params.temperature,
                            "top_p": params.top_p, "n": params.n}
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = params.stop
    # vLLM-style extensions, sent only when they differ from the OpenAI defaults.
    if params.top_k:
        body["top_k"] = params.top_k
    if params.repetition_penalty != 1.0:
        body["repetition_penalty"] = params.repetition_penalty
    if params.stop_token_ids:
        body["stop_token_ids"] = params.stop_token_ids
    if params.ignore_eos:
        body["ignore_eos"] = True
    if params.logprobs is not None:
        if chat:
            body["logprobs"] = True
            body["top_logprobs"] = params.logprobs
        else:
            body["logprobs"] = params.logprobs
    return body


def _chat_logprobs(raw: dict[str, Any] | None) -> list[TokenInfo]:
    out = []
    for item in (raw or {}).get("content") or []:
        top = [(-1, t["token"], float(t["logprob"])) for t in item.get("top_logprobs") or []]
        out.append(TokenInfo(-1, item["token"], float(item["logprob"]), top))
    return out


def _completion_logprobs(raw: dict[str, Any] | None) -> list[TokenInfo]:
    if not raw:
        return []
    tops = raw.get("top_logprobs") or [None] * len(raw.get("tokens", []))
    return [
        TokenInfo(-1, tok, float(lp) if lp is not None else 0.0,
                  [(-1, s, float(v)) for s, v in (top or {}).items()])
        for tok, lp, top in zip(raw.get("tokens", []), raw.get("token_logprobs", []), tops, strict=False)
    ]


class OpenAIBackend:
    engine_name = "openai"
    vocab_size = 0

    def __init__(self, model_id: str, base_url: str, api_key: str = "", upstream_model: str = "",
                 timeout_s: float = 120.0, context_length: int = 0) -> None:
        if not base_url:
            raise ValueError("the openai backend needs a base URL (LLMO_INFERENCE_OPENAI_BASE_URL)")
        self.model_id = model_id
        self.base_url = base_url.rstrip("/")
        self.upstream_model = upstream_model or model_id
        self.context_length = context_length
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                         timeout=httpx.Timeout(timeout_s, connect=10.0))

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await self._client.aclose()

    def info(self) -> ModelInfo:
        return ModelInfo(model_id=self.model_id, engine=self.engine_name, context_length=self.context_length)

    async def count_tokens(self, text: str | None, messages: list[dict[str, Any]] | None) -> list[int]:
        # vLLM and SGLang serve /tokenize next to /v1; the OpenAI API itself has no tokenizer endpoint.
        root = self.base_url.removesuffix("/v1")
        payload: dict[str, Any] = {"model": self.upstream_model}
        payload.update({"messages": messages} if messages else {"prompt": text or ""})
        try:
            response = await self._client.post(f"{root}/tokenize", json=payload)
        except httpx.HTTPError as exc:
            raise unavailable("BACKEND_UNAVAILABLE", f"upstream server unreachable: {exc}", backend="openai") from exc
        if response.status_code == 404:
            raise failed_precondition("TOKENIZER_UNAVAILABLE", "the upstream server has no /tokenize endpoint")
        if response.status_code >= 400:
            raise _upstream_error(response.status_code, response.text)
        return [int(t) for t in response.json().get("tokens", [])]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        request.check_input()
        chat = bool(request.messages)
        body: dict[str, Any] = {"model": self.upstream_model, "stream": True,
                                "stream_options": {"include_usage": True}, **_body_params(request.params, chat)}
        if chat:
            body["messages"] = request.messages
        else:
            body["prompt"] = request.prompt if request.prompt else list(request.prompt_token_ids or [])
        path = "/chat/completions" if chat else "/completions"
        start = time.monotonic()
        first: float | None = None
        usage: Usage | None = None
        finished: set[int] = set()
        tokens = 0
        try:
            async with self._client.stream("POST", path, json=body,
                                           headers={"x-request-id": request.request_id}) as response:
                if response.status_code >= 400:
                    raise _upstream_error(response.status_code, (await response.aread()).decode(errors="replace"))
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        err = event["error"]
                        raise _upstream_error(500, json.dumps({"error": err}))
                    if event.get("usage"):
                        u = event["usage"]
                        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                        usage = Usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0), cached)
                    choices = []
                    for c in event.get("choices") or []:
                        if chat:
                            text = (c.get("delta") or {}).get("content") or ""
                            infos = _chat_logprobs(c.get("logprobs"))
                        else:
                            text = c.get("text") or ""
                            infos = _completion_logprobs(c.get("logprobs"))
                        if not text and not c.get("finish_reason") and not infos:
                            continue
                        if first is None:
                            first = time.monotonic()
                        tokens += max(len(infos), 1 if text else 0)
                        reason = c.get("finish_reason")
                        if reason:
                            finished.add(int(c.get("index", 0)))
                        choices.append(ChoiceChunk(int(c.get("index", 0)), text, [], infos,
                                                   reason if reason in ("stop", "length") else
                                                   ("stop" if reason else None)))
                    if choices:
                        yield GenerationChunk(choices)
        except httpx.HTTPError as exc:
            raise unavailable("BACKEND_UNAVAILABLE", f"upstream server failed: {exc}", backend="openai") from exc
        end = time.monotonic()
        usage = usage or Usage(0, tokens, 0)
        per_seq = max(usage.completion_tokens // max(request.params.n, 1), 1)
        ttft = (first or end) - start
        yield GenerationChunk([], usage, Timings(
            queue_s=0.0, ttft_s=ttft, tpot_s=(end - (first or end)) / (per_seq - 1) if per_seq > 1 else 0.0,
            e2e_s=end - start))
