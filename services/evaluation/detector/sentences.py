"""Sentence splitting of a context, with character offsets.

A sentence ends at `.`, `!` or `?` followed by white space, or directly by a capital letter (the
SciFact abstracts are stored with their sentences joined without a space: "...States.Intravenous").
A few abbreviations ("e.g.", "i.e.", "et al.", "vs.", "Fig.", "Dr.") and decimals never end one.
Blank lines always do. Empty pieces are dropped; every sentence is an exact slice of the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BOUNDARY = re.compile(r"(?<=[.!?])(?:[\"')\]]*)(?:\s+|(?=[A-Z]))|\n\s*\n")
_NO_END = re.compile(r"(?:\b(?:e\.g|i\.e|et al|vs|cf|Fig|Figs|Dr|Mr|Mrs|Ms|Prof|approx)\.)$")
MAX_SENTENCE_CHARS = 2000  # a sentence longer than this is cut into pieces of this size


@dataclass(frozen=True)
class Sentence:
    """One sentence of a context: its text and its offsets `[start, end)` in the context."""

    text: str
    start: int
    end: int


def split_sentences(text: str) -> list[Sentence]:
    """The sentences of `text`, in order (stripped of surrounding white space)."""
    pieces: list[tuple[int, int]] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        end = match.start()
        if "\n" not in match.group(0) and _NO_END.search(text[start:end]):
            continue
        pieces.append((start, match.end()))
        start = match.end()
    pieces.append((start, len(text)))
    sentences = []
    for begin, finish in pieces:
        for cut in range(begin, finish, MAX_SENTENCE_CHARS):
            chunk_end = min(finish, cut + MAX_SENTENCE_CHARS)
            raw = text[cut:chunk_end]
            stripped = raw.strip()
            if stripped:
                offset = cut + (len(raw) - len(raw.lstrip()))
                sentences.append(Sentence(stripped, offset, offset + len(stripped)))
    return sentences
