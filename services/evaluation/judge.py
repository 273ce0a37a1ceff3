"""The judge: an OpenAI-compatible endpoint (the router by default) asked for judgements, with
retries, a concurrency limit over every caller, and a per-tenant cache of identical judgements.

`ask` makes `samples` calls (one choice each: the router refuses `n` > 1) and retries a call that
timed out or found the judge unavailable, with jittered exponential backoff. Logprobs are asked for
when wanted; an endpoint that refuses them (the router does, at its HTTP edge) is remembered and
asked without them, and the caller falls back to sampling. Identical judgements (tenant, model,
messages, sampling, logprobs and a caller's salt such as the repeat number) are answered from an
LRU cache without a call; a cache hit reports no calls and no usage. A router that denies the call
by budget (BUDGET_EXCEEDED) or does not know the model (JUDGE_MODEL_NOT_FOUND) is not retried.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections import OrderedDict
from dataclasses import dataclass, field

from llmo.chat_client import ChatClient, ChatError, TokenLogprob
from llmo.core.logging import get_logger

log = get_logger(__name__)

REASONS = {"TIMEOUT": "JUDGE_TIMEOUT", "UNAVAILABLE": "JUDGE_UNAVAILABLE", "REJECTED": "JUDGE_REJECTED",
           "BAD_OUTPUT": "JUDGE_BAD_OUTPUT"}
BACKOFF_S = 0.2


class JudgeError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class JudgeAnswer:
    texts: list[str]
    model: str
    logprobs: list[list[TokenLogprob] | None] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0
    calls: int = 0


class Judge:
    def __init__(self, client: ChatClient, *, retries: int = 2, concurrency: int = 8, cache_entries: int = 10_000
                 ) -> None:
        self.client = client
        self.retries = retries
        self.cache_entries = cache_entries
        self._limit = asyncio.Semaphore(concurrency)
        self._cache: OrderedDict[str, JudgeAnswer] = OrderedDict()
        self.logprobs_supported = True

    @property
    def default_model(self) -> str:
        return self.client.model

    async def _call(self, messages: list[dict[str, str]], *, tenant: str, purpose: str, model: str,
                    temperature: float, logprobs: bool, max_tokens: int | None) -> tuple[str, str, list[TokenLogprob] | None, int, int, int, int]:
        attempt = made = 0  # retries; requests made (a refused or failed request is a call too)
        while True:
            try:
                async with self._limit:
                    made += 1
                    done = await self.client.complete(messages, tenant=tenant, purpose=purpose, model=model,
                                                      temperature=temperature, logprobs=logprobs,
                                                      top_logprobs=20 if logprobs else 0, max_tokens=max_tokens)
                return (done.text, done.model, done.logprobs[0] if done.logprobs else None, done.input_tokens,
                        done.output_tokens, done.cost_micros, made)
            except ChatError as error:
                # The router's own refusals, by their code: neither is worth a retry.
                if error.code == "BUDGET_EXCEEDED":
                    raise JudgeError("BUDGET_EXCEEDED", error.detail) from error
                if error.code == "UNKNOWN_MODEL":
                    raise JudgeError("JUDGE_MODEL_NOT_FOUND", error.detail) from error
                if logprobs and error.reason == "REJECTED" and "logprob" in error.detail.lower():
                    self.logprobs_supported = False
                    logprobs = False
                    continue
                # No retry once the caller's deadline leaves no time for one.
                if error.reason in ("TIMEOUT", "UNAVAILABLE") and attempt < self.retries and self.client.timeout() > 0:
                    attempt += 1
                    await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1) * (0.5 + random.random()))
                    continue
                raise JudgeError(REASONS.get(error.reason, "JUDGE_UNAVAILABLE"), error.detail) from error

    async def ask(self, messages: list[dict[str, str]], *, tenant: str, purpose: str, model: str = "",
                  temperature: float = 0.0, samples: int = 1, logprobs: bool = False, cache_salt: str = "",
                  max_tokens: int | None = None) -> JudgeAnswer:
        logprobs = logprobs and self.logprobs_supported
        key = hashlib.sha256(json.dumps([tenant, model or self.client.model, messages, temperature, samples, logprobs,
                                         cache_salt, max_tokens], sort_keys=True).encode()).hexdigest()
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return JudgeAnswer(list(cached.texts), cached.model, list(cached.logprobs))
        # Distinct samples at temperature 0 would be one answer repeated: sample at 1 unless told otherwise.
        sample_temperature = temperature if samples == 1 or temperature > 0 else 1.0
        calls = await asyncio.gather(*(self._call(messages, tenant=tenant, purpose=f"{purpose}:{i}" if samples > 1
                                                  else purpose, model=model, temperature=sample_temperature,
                                                  logprobs=logprobs, max_tokens=max_tokens)
                                       for i in range(max(1, samples))))
        answer = JudgeAnswer([c[0] for c in calls], calls[0][1], [c[2] for c in calls],
                             sum(c[3] for c in calls), sum(c[4] for c in calls), sum(c[5] for c in calls),
                             sum(c[6] for c in calls))
        if self.cache_entries:
            self._cache[key] = answer
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)
        return answer
