"""Requests and their sequences (one per sample when n > 1)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from llmo.inference.engine.adapters import AdapterHandle
from llmo.inference.engine.params import SamplingParams
from llmo.inference.tokenizer import IncrementalDetokenizer


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    sequences: list[Sequence] = field(default_factory=list)
    forked: bool = False
    num_cached_tokens: int = 0
    # Prompt logprobs collected so far: entry i is for prompt token i + 1 given tokens 0..i.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    adapter: AdapterHandle | None = None  # the LoRA adapter it runs with (None: the base model)

    @property
    def cache_salt(self) -> bytes:
        """Starts the prefix-cache hash chain: KV computed under one adapter is never reused for another."""
        return self.adapter.salt if self.adapter is not None else b""

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs were asked for and some prompt positions are still to be computed.

        Such a request skips the prefix cache (its whole prompt is recomputed) so every position has logits.
        """
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids) - 1

    @property
    def finished(self) -> bool:
        return bool(self.sequences) and all(s.status is SeqStatus.FINISHED for s in self.sequences) and (
            self.forked or self.params.n == 1
        )


@dataclass
class Sequence:
    seq_id: int
    index: int
    request: Request
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_computed: int = 0
    text: str = ""
    emitted_chars: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_preemptions: int = 0

    @property
    def all_ids(self) -> list[int]:
        return self.request.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        """Tokens whose KV is not yet in the cache (the prompt, or the last sampled token)."""
        return self.num_tokens - self.num_computed

    @property
    def sort_key(self) -> tuple[int, float, int]:
        return (self.request.priority, self.request.arrival_time, self.seq_id)


@dataclass
class SequenceDelta:
    """What one step produced for one sequence."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    # Set on the request's first delta when prompt logprobs were asked for (one per prompt token after the first).
    prompt_logprobs: list[TokenLogprob] | None = None
