"""The OpenAI-compatible generator behind query expansion and HyDE (the router by default).

Each call is charged to the tenant that searched: the service authenticates with its own key
(`LLMO_RETRIEVAL_GENERATOR_API_KEY`) and names the tenant in `x-llmo-tenant`, with a request
id of its own per call (`<search request id>:<purpose>`), so the router meters every
generation once and bills the searcher. Calls never outlive `LLMO_RETRIEVAL_GENERATOR_TIMEOUT_S`
nor the search's own deadline; every failure is a `GeneratorError` with a stable reason, which
the search turns into a fallback to the plain query.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmo.chat_client import ChatClient, ChatError, chat_completions_url
from llmo.core.logging import get_logger

log = get_logger(__name__)

__all__ = ["Generation", "Generator", "GeneratorError", "chat_completions_url"]


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


class Generator(ChatClient):
    """Chat completions for query expansion and HyDE, failures as `GeneratorError`."""

    def __init__(self, base_url: str, *, api_key: str = "", model: str = "auto", timeout_s: float = 8.0,
                 max_tokens: int = 256) -> None:
        super().__init__(base_url, api_key=api_key, model=model, timeout_s=timeout_s, max_tokens=max_tokens)

    async def complete(self, messages: list[dict[str, str]], *, purpose: str, tenant: str,  # type: ignore[override]
                       model: str = "", user: str = "", temperature: float = 0.0) -> Generation:
        try:
            done = await super().complete(messages, tenant=tenant, purpose=purpose, model=model, user=user,
                                          temperature=temperature)
        except ChatError as error:
            reason = "GENERATOR_TIMEOUT" if error.reason == "TIMEOUT" else "GENERATOR_FAILED"
            detail = error.detail
            if error.reason == "TIMEOUT" and "deadline" in detail:
                detail = "no time left before the search's deadline"
            raise GeneratorError(reason, detail) from error
        return Generation(done.text, done.model, done.input_tokens, done.output_tokens)
