"""The OpenAI-compatible generator behind query expansion and HyDE (the router by default).

Each call is charged to the tenant that searched: the service authenticates with its own key
(`LLMO_RETRIEVAL_GENERATOR_API_KEY`) and names the tenant in `x-llmo-tenant`, with a request
id of its own per call (`<search request id>:<purpose>`), so the router meters every
generation once and bills the searcher. Calls never outlive `LLMO_RETRIEVAL_GENERATOR_TIMEOUT_S`
nor the search's own deadline; every failure is a `GeneratorError` with a stable reason, which
the search turns into a fallback to the plain query.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from llmo.core import context as ctx
from llmo.core.auth import ON_BEHALF_HEADER, REQUEST_ID_HEADER
from llmo.core.logging import get_logger

log = get_logger(__name__)

# Time kept back from the search's deadline for the retrieval after generation.
DEADLINE_MARGIN_S = 0.25


class GeneratorError(Exception):
    """A generation that did not happen; `reason` is GENERATOR_TIMEOUT or GENERATOR_FAILED."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Generation:
    text: str
    model: str
    input_tokens: int
    output_tokens: int


def chat_completions_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"


class Generator:
    """Non-streaming chat completions against one OpenAI-compatible endpoint."""

    def __init__(self, base_url: str, *, api_key: str = "", model: str = "auto", timeout_s: float = 8.0,
                 max_tokens: int = 256) -> None:
        self.url = chat_completions_url(base_url)
        self.api_key, self.model, self.timeout_s, self.max_tokens = api_key, model, timeout_s, max_tokens
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def timeout(self) -> float:
        remaining = ctx.remaining_seconds()
        if remaining is None:
            return self.timeout_s
        return max(0.0, min(self.timeout_s, remaining - DEADLINE_MARGIN_S))

    async def complete(self, messages: list[dict[str, str]], *, purpose: str, tenant: str, model: str = "",
                       user: str = "", temperature: float = 0.0) -> Generation:
        budget = self.timeout()
        if budget <= 0:
            raise GeneratorError("GENERATOR_TIMEOUT", "no time left before the search's deadline")
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        if tenant:
            headers[ON_BEHALF_HEADER] = tenant
        request_id = ctx.current_request_id()
        if request_id:
            headers[REQUEST_ID_HEADER] = f"{request_id}:{purpose}"
        body: dict[str, Any] = {"model": model or self.model, "messages": messages, "stream": False,
                                "max_tokens": self.max_tokens, "temperature": temperature}
        if user:
            body["user"] = user
        try:
            async with asyncio.timeout(budget):
                async with self._client().post(self.url, json=body, headers=headers) as response:
                    raw = await response.read()
                    status = response.status
        except TimeoutError as error:
            raise GeneratorError("GENERATOR_TIMEOUT", f"no answer within {budget:.2f}s") from error
        except aiohttp.ClientError as error:
            raise GeneratorError("GENERATOR_FAILED", f"{type(error).__name__}: {error}") from error
        if status != 200:
            raise GeneratorError("GENERATOR_FAILED", f"HTTP {status}: {_error_message(raw)}")
        return _parse(raw, body["model"])


def _error_message(raw: bytes) -> str:
    try:
        parsed = json.loads(raw)
        message = parsed.get("error", {}).get("message") if isinstance(parsed, dict) else None
    except (ValueError, AttributeError):
        message = None
    return str(message or raw[:200].decode("utf-8", "replace"))


def _parse(raw: bytes, asked: str) -> Generation:
    try:
        parsed = json.loads(raw)
        text = parsed["choices"][0]["message"]["content"]
        usage = parsed.get("usage") or {}
        if not isinstance(text, str):
            raise TypeError("content is not text")
        return Generation(text.strip(), str(parsed.get("model") or asked), int(usage.get("prompt_tokens") or 0),
                          int(usage.get("completion_tokens") or 0))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
        raise GeneratorError("GENERATOR_FAILED", f"not a chat completion: {error!r}") from error
