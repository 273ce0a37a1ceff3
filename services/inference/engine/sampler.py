"""Token sampling: repetition penalty, greedy, temperature, top-k, top-p, seeded generators, logprobs."""

from __future__ import annotations

import torch

from llmo.inference.engine.params import SamplingParams
from llmo.inference.engine.sequence import TokenLogprob


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> torch.Tensor:
    if penalty == 1.0 or not token_ids:
        return logits
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.int64, device=logits.device)
    ids = ids[ids < logits.shape[-1]]
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, history: list[int],
           generator: torch.Generator) -> tuple[int, TokenLogprob | None]:
    """Pick the next token from one row of float32 logits."""
    penalised = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.greedy:
        token = int(torch.argmax(penalised))
    else:
        scaled = filter_top_k_top_p(penalised / params.temperature, params.top_k, params.top_p)
        probs = scaled.softmax(-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    if params.logprobs is None:
        return token, None
    logp = torch.log_softmax(logits, -1)
    top: list[tuple[int, float]] = []
    if params.logprobs > 0:
        values, ids = torch.topk(logp, params.logprobs)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return token, TokenLogprob(token, float(logp[token]), top)


def prompt_token_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """Logprob of each target token under the matching row of float32 logits, plus the row's top k."""
    logp = torch.log_softmax(logits, -1)
    ids = torch.tensor(targets, dtype=torch.int64)
    chosen = logp.gather(1, ids[:, None]).squeeze(1).tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in targets]
    if k > 0:
        values, top_ids = torch.topk(logp, k, dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), values.tolist(), strict=True)]
    return [TokenLogprob(t, float(v), top) for t, v, top in zip(targets, chosen, tops, strict=True)]
