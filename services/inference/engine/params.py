"""Per-request sampling parameters and their bounds (the one validation both API edges use)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_TOP_LOGPROBS = 20
MAX_N = 16
MAX_STOP = 16
# A stop string is matched against every new piece of text: bounded so matching stays cheap.
MAX_STOP_LEN = 256
MAX_STOP_TOKEN_IDS = 64
# Token ids, top_k and max_tokens are int32 in the gRPC API; HTTP gets the same bounds.
MAX_INT32 = 2**31 - 1
# top_k above this is never useful (larger than any vocabulary in use); the vocabulary bounds it
# further where the backend knows it.
MAX_TOP_K = 1 << 20
# int64, as in the gRPC API (seed + sample index still fits torch's generator seed, which takes up to 2**64 - 1).
SEED_RANGE = (-(2**63), 2**63 - 1)


class SamplingError(ValueError):
    """A sampling parameter out of range; `field` names it (the SamplingParams attribute)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token plus the top k
    # None: none; k >= 0: each prompt token after the first (given its prefix) plus the top k, sent once
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def validate(self, vocab_size: int = 0) -> None:
        """Raise SamplingError naming the first bad field. `vocab_size` (0: unknown) bounds top_k and
        stop_token_ids further."""
        token_limit = vocab_size or MAX_INT32
        top_k_limit = min(vocab_size or MAX_TOP_K, MAX_TOP_K)
        checks: list[tuple[bool, str, str]] = [
            (0 <= self.max_tokens <= MAX_INT32
             and (self.max_tokens >= 1 or (self.prompt_logprobs is not None and self.n == 1)), "max_tokens",
             f"max_tokens must be in [1, {MAX_INT32}] (0 only with prompt_logprobs and n = 1), got {self.max_tokens}"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
             f"temperature must be a finite number >= 0, got {self.temperature}"),
            (math.isfinite(self.top_p) and 0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.top_k <= top_k_limit, "top_k",
             f"top_k must be in [0, {top_k_limit}] (0 disables it), got {self.top_k}"),
            (self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1], "seed",
             f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
             f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}"),
            (1 <= self.n <= MAX_N, "n", f"n must be in [1, {MAX_N}], got {self.n}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS, "logprobs",
             f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS, "prompt_logprobs",
             f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs}"),
            (len(self.stop) <= MAX_STOP, "stop", f"at most {MAX_STOP} stop strings, got {len(self.stop)}"),
            (all(0 < len(s) <= MAX_STOP_LEN for s in self.stop), "stop",
             f"stop strings must be 1 to {MAX_STOP_LEN} characters"),
            (len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
             f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(self.stop_token_ids)}"),
            (all(0 <= t < token_limit for t in self.stop_token_ids), "stop_token_ids",
             f"stop_token_ids must be token ids in [0, {token_limit})"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise SamplingError(name, message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
