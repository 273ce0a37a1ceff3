"""Stages after ranking: ordering the results for a prompt and extractive compression."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from llmo.core.errors import invalid_argument
from llmo.retrieval import chunking

T = TypeVar("T")
MAX_COMPRESSION_TOKENS = 32_768
# A sentence is worth keeping when its similarity to the query is at least this share of the best one's.
RELATIVE_CUT = 0.6


def reorder_for_context(items: Sequence[T]) -> list[T]:
    """Best-first items placed so the strongest sit at both ends and the weakest in the middle
    (language models use the start and end of a long context best): 1, 3, 5, ..., 6, 4, 2."""
    front = list(items[0::2])
    back = list(items[1::2])
    return front + back[::-1]


@dataclass
class Compressed:
    texts: list[str]
    """Per candidate, the sentences kept (in document order), empty when none."""
    context: str
    """The kept sentences of every candidate, joined for a prompt."""
    sentences_kept: int
    tokens: int


def check_options(max_tokens: int) -> None:
    if not 0 <= max_tokens <= MAX_COMPRESSION_TOKENS:
        raise invalid_argument("INVALID_STAGE_OPTIONS", f"compression.max_tokens must be in 0..{MAX_COMPRESSION_TOKENS}",
                               field="compression.max_tokens")


def compress(query_vector: np.ndarray, texts: Sequence[str], max_tokens: int,
             encode: Callable[[list[str]], np.ndarray]) -> Compressed:
    """Extractive compression of `texts` (the results, best first) against the query (blocking).

    Every sentence is scored by the cosine of its MiniLM vector with the query's. Sentences
    scoring at least RELATIVE_CUT x the best sentence's score are candidates; they are taken
    best first while they fit in `max_tokens` (0: no budget), a sentence that does not fit is
    skipped for a shorter one. Each result keeps its chosen sentences in document order;
    `context` joins the results' kept text with blank lines, in the results' order."""
    split = [chunking.sentences(t) for t in texts]
    flat = [(i, j, sentence) for i, parts in enumerate(split) for j, sentence in enumerate(parts)]
    if not flat:
        return Compressed(["" for _ in texts], "", 0, 0)
    vectors = np.asarray(encode([sentence for _, _, sentence in flat]), dtype=np.float32)
    scores = vectors @ np.asarray(query_vector, dtype=np.float32)
    best = float(scores.max())
    cut = RELATIVE_CUT * best if best > 0 else best
    order = sorted(range(len(flat)), key=lambda n: (-float(scores[n]), flat[n][0], flat[n][1]))
    chosen: set[int] = set()
    used = 0
    for n in order:
        if scores[n] < cut:
            break
        cost = chunking.token_count(flat[n][2])
        if max_tokens and used + cost > max_tokens:
            continue
        chosen.add(n)
        used += cost
    kept: list[list[str]] = [[] for _ in texts]
    for n in sorted(chosen, key=lambda n: (flat[n][0], flat[n][1])):
        kept[flat[n][0]].append(flat[n][2])
    out = [" ".join(parts) for parts in kept]
    return Compressed(out, "\n\n".join(t for t in out if t), len(chosen), used)
