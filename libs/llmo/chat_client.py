"""A non-streaming client of one OpenAI-compatible chat completions endpoint (the router by default),
shared by the services that call a model for an end tenant (retrieval's generator, evaluation's judge
and target).

Each call is charged to the tenant being served: the service authenticates with its own key and names
the tenant in `x-llmo-tenant`, with a request id of its own per call (`<request id>:<purpose>`), so the
router meters every call once and bills that tenant. A call never outlives `timeout_s` nor the
deadline of the RPC being served. Every failure is a `ChatError` with a stable reason: TIMEOUT,
UNAVAILABLE (connection refused, 5xx, 429), REJECTED (another 4xx; `detail` carries the server's
message) or BAD_OUTPUT (the answer is not a chat completion). The router reports its cost in the
body's `llmo.cost_micros`; other endpoints report none (0).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from llmo.core import context as ctx
from llmo.core.auth import ON_BEHALF_HEADER, REQUEST_ID_HEADER

DEADLINE_MARGIN_S = 0.25  # kept back from the RPC's deadline for the work after the call


class ChatError(Exception):
    def __init__(self, reason: str, detail: str, status: int = 0, code: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.status, self.code = reason, detail, status, code


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Completion:
    texts: list[str]
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0
    # Per choice, the tokens with their logprobs, when asked for and returned.
    logprobs: list[list[TokenLogprob] | None] = field(default_factory=list)
    # URLs the answer cites: the first choice's `url_citation` annotations (OpenAI search models) and
    # a top-level `citations` list (Perplexity).
    citations: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.texts[0]


def chat_completions_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"


class ChatClient:
    def __init__(self, base_url: str, *, api_key: str = "", model: str = "auto", timeout_s: float = 30.0,
                 max_tokens: int = 512) -> None:
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

    async def complete(self, messages: list[dict[str, str]], *, tenant: str, purpose: str, model: str = "",
                       temperature: float = 0.0, n: int = 1, logprobs: bool = False, top_logprobs: int = 0,
                       max_tokens: int | None = None, user: str = "", response_format: dict[str, Any] | None = None,
                       extra_body: dict[str, Any] | None = None) -> Completion:
        budget = self.timeout()
        if budget <= 0:
            raise ChatError("TIMEOUT", "no time left before the caller's deadline")
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        if tenant:
            headers[ON_BEHALF_HEADER] = tenant
        request_id = ctx.current_request_id()
        if request_id:
            headers[REQUEST_ID_HEADER] = f"{request_id}:{purpose}"
        body: dict[str, Any] = {"model": model or self.model, "messages": messages, "stream": False,
                                "max_tokens": max_tokens or self.max_tokens, "temperature": temperature}
        if n > 1:
            body["n"] = n
        if logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = top_logprobs
        if user:
            body["user"] = user
        if response_format is not None:
            body["response_format"] = response_format
        body.update(extra_body or {})
        try:
            async with asyncio.timeout(budget):
                async with self._client().post(self.url, json=body, headers=headers) as response:
                    raw = await response.read()
                    status = response.status
        except TimeoutError as error:
            raise ChatError("TIMEOUT", f"no answer within {budget:.2f}s") from error
        except aiohttp.ClientError as error:
            raise ChatError("UNAVAILABLE", f"{type(error).__name__}: {error}") from error
        if status != 200:
            message, code = _error_of(raw)
            reason = "UNAVAILABLE" if status >= 500 or status == 429 else "REJECTED"
            raise ChatError(reason, f"HTTP {status}: {message}", status, code)
        return _parse(raw, body["model"])


def _error_of(raw: bytes) -> tuple[str, str]:
    """(message, code) of an OpenAI-style error body, else the start of the body and no code."""
    message: Any = None
    code: Any = None
    try:
        parsed = json.loads(raw)
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(error, dict):
            message, code = error.get("message"), error.get("code")
    except ValueError:
        pass
    return str(message or raw[:200].decode("utf-8", "replace")), code if isinstance(code, str) else ""


def _logprobs(choice: dict[str, Any]) -> list[TokenLogprob] | None:
    content = (choice.get("logprobs") or {}).get("content")
    if not isinstance(content, list):
        return None
    return [TokenLogprob(str(t["token"]), float(t["logprob"]),
                         tuple((str(x["token"]), float(x["logprob"])) for x in t.get("top_logprobs") or ()))
            for t in content]


def _citations(parsed: dict[str, Any], choice: dict[str, Any]) -> list[str]:
    found: list[str] = []
    annotations = (choice.get("message") or {}).get("annotations")
    for annotation in annotations if isinstance(annotations, list) else ():
        cited = annotation.get("url_citation") if isinstance(annotation, dict) else None
        if isinstance(cited, dict) and isinstance(cited.get("url"), str):
            found.append(cited["url"])
    listed = parsed.get("citations")
    for url in listed if isinstance(listed, list) else ():
        if isinstance(url, str):
            found.append(url)
        elif isinstance(url, dict) and isinstance(url.get("url"), str):
            found.append(url["url"])
    return found


def _parse(raw: bytes, asked: str) -> Completion:
    try:
        parsed = json.loads(raw)
        choices = parsed["choices"]
        texts = [c["message"]["content"] for c in choices]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("content is not text")
        usage = parsed.get("usage") or {}
        cost = (parsed.get("llmo") or {}).get("cost_micros") or 0
        return Completion([t.strip() for t in texts], str(parsed.get("model") or asked),
                          int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), int(cost),
                          [_logprobs(c) for c in choices], _citations(parsed, choices[0]))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
        raise ChatError("BAD_OUTPUT", f"not a chat completion: {error!r}") from error
