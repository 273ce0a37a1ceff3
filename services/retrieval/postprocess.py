"""Stages after ranking: ordering the results for a prompt and extractive compression."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from llmo.core.errors import invalid_argument

T = TypeVar("T")
MAX_COMPRESSION_TOKENS = 32_768


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


def check_options(enabled: bool, max_tokens: int) -> None:
    if enabled:
        raise invalid_argument("NOT_YET_SUPPORTED", "compression.enabled is not supported yet by this retrieval service",
                               field="compression.enabled")
    if not 0 <= max_tokens <= MAX_COMPRESSION_TOKENS:
        raise invalid_argument("INVALID_STAGE_OPTIONS", f"compression.max_tokens must be in 0..{MAX_COMPRESSION_TOKENS}",
                               field="compression.max_tokens")


def compress(query: str, query_vector: Any, candidates: Sequence[Any], max_tokens: int, embedder: Any) -> Compressed:
    """Extractive compression of the candidates' text against the query (blocking)."""
    raise invalid_argument("NOT_YET_SUPPORTED", "compression.enabled is not supported yet by this retrieval service",
                           field="compression.enabled")
