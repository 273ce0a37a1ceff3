"""Context management: chat-history pruning to a token budget and extractive compression.

Pruning always keeps every system message and the latest turn; older turns are ranked by
relevance to the latest message (cosine similarity of MiniLM embeddings, or word overlap
when no embedder is given) blended with recency, and the best that fit are kept in their
original order. Compression keeps the sentences most relevant to a query up to a token
budget, also in order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from llmo.router.tokens import MESSAGE_OVERHEAD_TOKENS, count_tokens_batch

Encoder = Callable[[Sequence[str]], np.ndarray]

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])|\n{2,}")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class PruneResult:
    messages: list[Message]
    tokens_before: int
    tokens_after: int
    dropped: list[int] = field(default_factory=list)
    over_budget: bool = False

    @property
    def tokens_saved(self) -> int:
        return self.tokens_before - self.tokens_after


@dataclass(frozen=True)
class CompressResult:
    text: str
    tokens_before: int
    tokens_after: int
    kept_sentences: int
    total_sentences: int

    @property
    def tokens_saved(self) -> int:
        return self.tokens_before - self.tokens_after


def _lexical_similarity(query: str, texts: Sequence[str]) -> np.ndarray:
    q = {w.lower() for w in _WORD.findall(query)}
    out = []
    for t in texts:
        words = {w.lower() for w in _WORD.findall(t)}
        union = q | words
        out.append(len(q & words) / len(union) if union else 0.0)
    return np.array(out, dtype=np.float64)


def _relevance(query: str, texts: Sequence[str], encoder: Encoder | None) -> np.ndarray:
    if not texts:
        return np.zeros(0)
    if encoder is None:
        return _lexical_similarity(query, texts)
    vectors = encoder([query, *texts])
    return np.clip(vectors[1:] @ vectors[0], -1.0, 1.0).astype(np.float64)


def prune_history(
    messages: Sequence[Message],
    budget_tokens: int,
    encoder: Encoder | None = None,
    recency_weight: float = 0.35,
) -> PruneResult:
    """Drop older turns until the conversation fits `budget_tokens`."""
    if budget_tokens <= 0:
        raise ValueError("budget_tokens must be positive")
    if not messages:
        raise ValueError("no messages to prune")
    costs = [c + MESSAGE_OVERHEAD_TOKENS for c in count_tokens_batch([m.content for m in messages])]
    total = sum(costs)
    if total <= budget_tokens:
        return PruneResult(list(messages), total, total)
    last = len(messages) - 1
    pinned = {i for i, m in enumerate(messages) if m.role == "system"} | {last}
    used = sum(costs[i] for i in pinned)
    candidates = [i for i in range(len(messages)) if i not in pinned]
    relevance = _relevance(messages[last].content, [messages[i].content for i in candidates], encoder)
    scores = {}
    for rank, i in enumerate(candidates):
        recency = (i + 1) / len(messages)
        scores[i] = (1 - recency_weight) * float(relevance[rank]) + recency_weight * recency
    keep = set(pinned)
    for i in sorted(candidates, key=lambda j: -scores[j]):
        if used + costs[i] <= budget_tokens:
            keep.add(i)
            used += costs[i]
    kept = [m for i, m in enumerate(messages) if i in keep]
    return PruneResult(
        messages=kept,
        tokens_before=total,
        tokens_after=used,
        dropped=sorted(set(range(len(messages))) - keep),
        over_budget=used > budget_tokens,
    )


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text) if s and s.strip()]


def compress_text(
    text: str,
    budget_tokens: int,
    query: str = "",
    encoder: Encoder | None = None,
    position_weight: float = 0.15,
) -> CompressResult:
    """Extractive compression: keep the most query-relevant sentences that fit `budget_tokens`.

    Without a query, sentences are ranked by similarity to the whole text (centrality).
    """
    if budget_tokens <= 0:
        raise ValueError("budget_tokens must be positive")
    sentences = split_sentences(text)
    costs = count_tokens_batch(sentences)
    before = sum(costs)
    if before <= budget_tokens or len(sentences) <= 1:
        return CompressResult(text, before, before, len(sentences), len(sentences))
    relevance = _relevance(query or text, sentences, encoder)
    n = len(sentences)
    scores = [(1 - position_weight) * float(relevance[i]) + position_weight * (1 - i / n) for i in range(n)]
    keep: set[int] = set()
    used = 0
    for i in sorted(range(n), key=lambda j: -scores[j]):
        if used + costs[i] <= budget_tokens:
            keep.add(i)
            used += costs[i]
    out = " ".join(sentences[i] for i in sorted(keep))
    return CompressResult(out, before, used, len(keep), n)
