"""What every backend exposes to the gRPC and HTTP layers."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmo.core.errors import invalid_argument
from llmo.inference.engine.params import MAX_INT32, SamplingParams


@dataclass
class GenerationRequest:
    request_id: str  # the platform's id of the call (events, responses); a trusted caller may reuse one
    params: SamplingParams
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_token_ids: list[int] | None = None
    priority: int = 0
    # A LoRA adapter loaded on the backend's model (None: the base model); set by the model registry.
    adapter: str | None = None
    # What an engine knows this generation by: unique even when two calls share a request id.
    engine_id: str = field(default_factory=lambda: secrets.token_hex(8))

    def check_input(self) -> None:
        given = sum(x is not None and len(x) > 0 for x in (self.prompt, self.messages, self.prompt_token_ids))
        if given != 1:
            raise invalid_argument("PROMPT_MISSING", "set exactly one of prompt, messages and prompt_token_ids "
                                   "(non-empty)")
        if not -MAX_INT32 - 1 <= self.priority <= MAX_INT32:
            raise invalid_argument("INVALID_PRIORITY", f"priority must be in [{-MAX_INT32 - 1}, {MAX_INT32}]",
                                   field="priority")


@dataclass
class TokenInfo:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class PromptTokenInfo:
    """A prompt token with its logprob given the tokens before it (None for the first prompt token)."""

    token_id: int
    token: str
    logprob: float | None
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class ChoiceChunk:
    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Timings:
    queue_s: float = 0.0
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    e2e_s: float = 0.0


@dataclass
class GenerationChunk:
    choices: list[ChoiceChunk]
    usage: Usage | None = None  # set on the last chunk
    timings: Timings | None = None  # set on the last chunk
    prompt_logprobs: list[PromptTokenInfo] | None = None  # every prompt token; on the first chunk, when asked


@dataclass
class ModelInfo:
    model_id: str
    engine: str
    architecture: str = ""
    quantization: str = "none"
    context_length: int = 0
    dtype: str = ""
    parameter_count: int = 0
    kv_block_size: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    num_running: int = 0
    num_waiting: int = 0
    prefix_cache_hit_rate: float = 0.0


class Backend(Protocol):
    model_id: str
    engine_name: str
    # Bounds token ids and top_k in requests; 0 when the backend does not know its vocabulary.
    vocab_size: int

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def info(self) -> ModelInfo: ...

    async def count_tokens(self, text: str | None, messages: list[dict[str, Any]] | None) -> list[int]: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...
