"""Client for any OpenAI-compatible `/chat/completions` endpoint (streaming SSE).

Every server-sent event is parsed and validated; a malformed event, a stream that ends
without a finish reason or `[DONE]`, a hang before the first token or between tokens,
and 429/5xx answers all raise ProviderError so the gateway can fall back.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from llmo.core.auth import ON_BEHALF_HEADER, REQUEST_ID_HEADER
from llmo.core.limits import preview
from llmo.router.providers.base import ChatRequest, Chunk, ProviderError, Usage, usage_of

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
# The request itself was refused (malformed, unknown model, too large, unprocessable):
# the caller's fault, not the provider's.
CLIENT_ERROR_STATUS = frozenset({400, 404, 413, 422})
APPLICATION_HEADER = "x-llmo-application"


class OpenAIHttpClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        connect_timeout_s: float = 3.0,
        first_token_timeout_s: float = 10.0,
        idle_timeout_s: float = 10.0,
        total_timeout_s: float = 120.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.connect_timeout_s = connect_timeout_s
        self.first_token_timeout_s = first_token_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.total_timeout_s = total_timeout_s
        self._session = session
        self._own_session = session is None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages,
        }
        if request.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        body.update(request.sampling.openai_fields())
        if request.user:
            body["user"] = request.user
        body.update(request.extra)
        return body

    async def stream(self, request: ChatRequest) -> AsyncIterator[Chunk]:
        headers = {"content-type": "application/json", "accept": "text/event-stream"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        if request.request_id:
            headers[REQUEST_ID_HEADER] = request.request_id
        if request.tenant:
            headers[ON_BEHALF_HEADER] = request.tenant
        if request.application:
            headers[APPLICATION_HEADER] = request.application
        # sock_read also bounds the wait for the response headers, so an upstream that
        # accepts the connection and never answers is cut off too.
        timeout = aiohttp.ClientTimeout(
            total=self.total_timeout_s,
            sock_connect=self.connect_timeout_s,
            connect=self.connect_timeout_s,
            sock_read=max(self.first_token_timeout_s, self.idle_timeout_s),
        )
        session = self._get_session()
        try:
            async with session.post(self.url, json=self._body(request), headers=headers, timeout=timeout) as resp:
                if resp.status != 200:
                    text = (await resp.content.read(4096)).decode("utf-8", errors="replace")
                    message, param = upstream_error(text)
                    raise ProviderError(
                        "UPSTREAM_STATUS",
                        f"upstream answered HTTP {resp.status}: {preview(message, 300)}",
                        retryable=resp.status in RETRYABLE_STATUS,
                        status=resp.status,
                        client_error=resp.status in CLIENT_ERROR_STATUS,
                        param=param,
                    )
                if not request.stream:
                    yield await self._whole(resp)
                    return
                async for chunk in self._events(resp):
                    yield chunk
        except ProviderError:
            raise
        except TimeoutError as exc:
            raise ProviderError("UPSTREAM_TIMEOUT", "upstream timed out", retryable=True) from exc
        except aiohttp.ClientError as exc:
            raise ProviderError("UPSTREAM_UNREACHABLE", f"upstream connection failed: {exc}", retryable=True) from exc
        except ValueError as exc:  # aiohttp: an event line longer than its buffer
            raise ProviderError("UPSTREAM_GARBAGE", f"unreadable event stream: {exc}", retryable=True) from exc

    async def _whole(self, resp: aiohttp.ClientResponse) -> Chunk:
        try:
            async with asyncio.timeout(self.first_token_timeout_s + self.idle_timeout_s):
                raw = await resp.read()
        except TimeoutError as exc:
            raise ProviderError("UPSTREAM_HUNG", "no answer in time", retryable=True) from exc
        return parse_completion(raw)

    async def _events(self, resp: aiohttp.ClientResponse) -> AsyncIterator[Chunk]:
        first = True
        finished: str | None = None
        usage: Usage | None = None
        while True:
            wait = self.first_token_timeout_s if first else self.idle_timeout_s
            try:
                async with asyncio.timeout(wait):
                    raw = await resp.content.readline()
            except TimeoutError as exc:
                what = "first token" if first else "next token"
                raise ProviderError("UPSTREAM_HUNG", f"no {what} within {wait:g}s", retryable=True) from exc
            if not raw:
                break
            line = raw.decode("utf-8", errors="replace").strip()
            if not line or line.startswith(":"):
                continue
            if not line.startswith("data:"):
                if line.startswith(("event:", "id:", "retry:")):
                    continue
                raise ProviderError("UPSTREAM_GARBAGE", f"not a server-sent event: {line[:80]!r}", retryable=True)
            data = line[5:].strip()
            if data == "[DONE]":
                if finished is None:
                    raise ProviderError("UPSTREAM_TRUNCATED", "stream ended without a finish reason", retryable=True)
                if usage is not None:
                    yield Chunk(usage=usage)
                return
            first = False
            text, reason, chunk_usage = parse_stream_event(data)
            usage = chunk_usage or usage
            if reason is not None:
                finished = reason
            if text or reason is not None:
                yield Chunk(text=text, finish_reason=reason)
        if finished is None:
            raise ProviderError("UPSTREAM_TRUNCATED", "stream closed before it finished", retryable=True)
        if usage is not None:
            yield Chunk(usage=usage)


def parse_stream_event(data: str) -> tuple[str, str | None, Usage | None]:
    """(delta text, finish reason, usage) of one `chat.completion.chunk` event; raises on garbage."""
    try:
        event = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ProviderError("UPSTREAM_GARBAGE", f"event is not JSON: {data[:80]!r}", retryable=True) from exc
    if not isinstance(event, dict):
        raise ProviderError("UPSTREAM_GARBAGE", "event is not a JSON object", retryable=True)
    if "error" in event:
        message = str(event["error"])[:200]
        raise ProviderError("UPSTREAM_ERROR", f"upstream error mid-stream: {message}", retryable=True)
    usage = None
    raw_usage = event.get("usage")
    if isinstance(raw_usage, dict):
        try:
            usage = usage_of(raw_usage)
        except (TypeError, ValueError) as exc:
            raise ProviderError("UPSTREAM_GARBAGE", "usage is not numeric", retryable=True) from exc
    choices = event.get("choices")
    if not isinstance(choices, list):
        raise ProviderError("UPSTREAM_GARBAGE", "event has no choices list", retryable=True)
    if not choices:
        return "", None, usage
    choice = choices[0]
    delta = choice.get("delta") if isinstance(choice, dict) else None
    if not isinstance(delta, dict):
        raise ProviderError("UPSTREAM_GARBAGE", "choice has no delta object", retryable=True)
    content = delta.get("content")
    if content is not None and not isinstance(content, str):
        raise ProviderError("UPSTREAM_GARBAGE", "delta content is not a string", retryable=True)
    reason = choice.get("finish_reason")
    if reason is not None and not isinstance(reason, str):
        raise ProviderError("UPSTREAM_GARBAGE", "finish_reason is not a string", retryable=True)
    return content or "", reason, usage


def upstream_error(text: str) -> tuple[str, str | None]:
    """The message and `param` of an OpenAI-style error body (the raw text when it is not one)."""
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text, None
    if not isinstance(error, dict):
        return text, None
    message = error.get("message")
    param = error.get("param")
    return (message if isinstance(message, str) else text), (param[:128] if isinstance(param, str) and param else None)


def parse_completion(raw: bytes) -> Chunk:
    """The answer of a non-streaming `chat.completion`; raises on garbage."""
    try:
        body = json.loads(raw)
        choice = body["choices"][0]
        content = choice["message"].get("content") or ""
        reason = choice.get("finish_reason") or "stop"
        if not isinstance(content, str) or not isinstance(reason, str):
            raise TypeError("content and finish_reason must be strings")
        raw_usage = body.get("usage") or {}
        usage = usage_of(raw_usage) if raw_usage else None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ProviderError("UPSTREAM_GARBAGE", f"malformed chat.completion: {exc}", retryable=True) from exc
    return Chunk(text=content, finish_reason=reason, usage=usage)
