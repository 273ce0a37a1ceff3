"""Turns cumulative outputs (what vLLM and TensorRT-LLM stream) into our deltas."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llmo.inference.backends.base import ChoiceChunk, GenerationChunk, Timings, TokenInfo, Usage


@dataclass
class CumulativeTracker:
    n: int
    start: float = field(default_factory=time.monotonic)
    first: float | None = None
    texts: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.texts = [""] * self.n
        self.tokens = [0] * self.n

    def delta(self, index: int, text: str, token_ids: list[int], finish_reason: str | None,
              logprobs: list[TokenInfo] | None = None) -> ChoiceChunk | None:
        new_text = text[len(self.texts[index]):]
        new_ids = list(token_ids[self.tokens[index]:])
        self.texts[index] = text
        self.tokens[index] = len(token_ids)
        if not new_text and not new_ids and finish_reason is None:
            return None
        if self.first is None:
            self.first = time.monotonic()
        reason = None if finish_reason is None else ("length" if finish_reason == "length" else "stop")
        return ChoiceChunk(index, new_text, new_ids, list(logprobs or []), reason)

    def final(self, prompt_tokens: int, cached_tokens: int = 0) -> GenerationChunk:
        end = time.monotonic()
        completion = sum(self.tokens)
        first = self.first or end
        per_seq = max(completion // max(self.n, 1), 1)
        return GenerationChunk([], Usage(prompt_tokens, completion, cached_tokens), Timings(
            queue_s=0.0, ttft_s=first - self.start, tpot_s=(end - first) / (per_seq - 1) if per_seq > 1 else 0.0,
            e2e_s=end - self.start))
