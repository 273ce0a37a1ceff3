"""What the gateway needs from a provider: a stream of validated text chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmo.router.sampling import Sampling


@dataclass(frozen=True)
class ChatRequest:
    """An upstream chat completion request (the model is the provider's own name)."""

    model: str
    messages: list[dict[str, str]]
    max_tokens: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    extra: dict[str, Any] = field(default_factory=dict)
    # False: the caller wants the whole answer at once; providers may then make one
    # non-streaming upstream call (cheaper) and yield a single chunk.
    stream: bool = True
    # Sent upstream (`x-request-id`) so the upstream's usage event and the router's
    # describe the same call and the cost ledger charges it once.
    request_id: str = ""
    # The end tenant the call is for (`x-llmo-tenant`), and its application and user: the
    # upstream charges them, not the router's own key (honoured from service keys only).
    tenant: str = ""
    application: str = ""
    user: str = ""


@dataclass(frozen=True)
class Usage:
    """OpenAI's usage: `prompt_tokens` includes the `cached_tokens` the upstream served from its
    prefix cache (`prompt_tokens_details.cached_tokens`)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def uncached_prompt_tokens(self) -> int:
        """What `llmo.common.v1.Usage.input_tokens` means (cached tokens are counted apart)."""
        return max(0, self.prompt_tokens - self.cached_tokens)


def usage_of(raw: dict[str, object]) -> Usage:
    """The usage object of an OpenAI response or stream chunk (raises TypeError/ValueError on garbage)."""
    details = raw.get("prompt_tokens_details")
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    return Usage(int(raw.get("prompt_tokens", 0) or 0), int(raw.get("completion_tokens", 0) or 0),  # type: ignore[call-overload]
                 int(cached or 0))


@dataclass(frozen=True)
class Chunk:
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None


class ProviderError(Exception):
    """A provider call failed. `retryable` errors may be retried on the same provider;
    every provider error moves the request down its fallback chain. `client_error` marks
    a request the upstream rejected as malformed (or too large), which no fallback would
    accept either: it is the caller's fault, so it never counts against the provider's breaker."""

    def __init__(
        self, reason: str, message: str, *, retryable: bool, status: int | None = None, client_error: bool = False,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable
        self.status = status
        self.client_error = client_error
        # The request field the upstream refused (its error's `param` / ErrorInfo `field`), if it named one.
        self.param = param

    def __repr__(self) -> str:
        return f"ProviderError({self.reason!r}, {self.message!r}, retryable={self.retryable})"


class ProviderClient(Protocol):
    def stream(self, request: ChatRequest) -> AsyncIterator[Chunk]:
        """Yield chunks; the last one has `finish_reason` set. Raise ProviderError on failure."""
        ...

    async def close(self) -> None: ...
