"""Split extracted text into chunks measured in tokens of the embedding model's tokenizer.

Strategies (the contract's `ChunkingStrategy`):

- FIXED: windows of `size` tokens, consecutive windows sharing `overlap` tokens;
- SENTENCE: whole sentences packed up to `size` tokens; the next chunk repeats the trailing
  sentences of the previous one that fit in `overlap` tokens;
- RECURSIVE (the default): paragraphs packed up to `size`; a paragraph too long is split into
  sentences, a sentence too long into FIXED windows;
- HEADING: the text is cut at every heading first, so no chunk spans two sections; each
  section is then split as RECURSIVE.

Every chunk is an exact slice `text[start:end]` of the extracted text, with the headings that
enclose its start (outermost first).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmo.retrieval.extract import Extracted, Heading

FIXED, SENTENCE, RECURSIVE, HEADING = 1, 2, 3, 4  # values of llmo.retrieval.v1.ChunkingStrategy
MAX_CHUNK_TOKENS = 2048

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*")


@dataclass(frozen=True)
class TextChunk:
    text: str
    start: int
    end: int
    token_count: int
    heading_path: tuple[str, ...]


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    tokens: int


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    """The MiniLM tokenizer (the bundled tokenizer.json; loads in milliseconds, no model weights)."""
    from tokenizers import Tokenizer

    from llmo.embedding import model_path

    loaded = Tokenizer.from_file(str(model_path() / "tokenizer.json"))
    loaded.no_truncation()
    loaded.no_padding()
    return loaded


class Chunker:
    def __init__(self, size: int, overlap: int, strategy: int) -> None:
        if not 0 < size <= MAX_CHUNK_TOKENS or not 0 <= overlap < size:
            raise ValueError(f"chunk size must be in 1..{MAX_CHUNK_TOKENS} and overlap in 0..size-1")
        self.size, self.overlap, self.strategy = size, overlap, strategy or RECURSIVE

    def split(self, doc: Extracted) -> list[TextChunk]:
        text = doc.text
        encoding = tokenizer().encode(text, add_special_tokens=False)
        self._starts = [s for s, _ in encoding.offsets]
        self._ends = [e for _, e in encoding.offsets]
        self._text = text
        if not self._starts:
            return []
        if self.strategy == FIXED:
            spans = self._fixed(0, len(text))
        elif self.strategy == SENTENCE:
            spans = self._pack(self._fit(self._sentences(0, len(text))))
        elif self.strategy == HEADING:
            spans = []
            bounds = [0, *[h.offset for h in doc.headings if h.offset > 0], len(text)]
            for start, end in itertools.pairwise(bounds):
                spans += self._pack(self._recursive_units(start, end))
        else:
            spans = self._pack(self._recursive_units(0, len(text)))
        paths = _heading_paths(doc.headings)
        offsets = [h.offset for h in doc.headings]
        out = []
        for span in spans:
            where = bisect.bisect_right(offsets, span.start) - 1
            out.append(TextChunk(text[span.start:span.end], span.start, span.end, span.tokens,
                                 paths[where] if where >= 0 else ()))
        return out

    # --- spans -------------------------------------------------------------------------------

    def _span(self, start: int, end: int) -> _Span | None:
        """`text[start:end]` without surrounding whitespace, with its token count (None if empty)."""
        while start < end and self._text[start].isspace():
            start += 1
        while end > start and self._text[end - 1].isspace():
            end -= 1
        if start >= end:
            return None
        tokens = bisect.bisect_left(self._starts, end) - bisect.bisect_left(self._starts, start)
        return _Span(start, end, tokens) if tokens else None

    def _fixed(self, start: int, end: int) -> list[_Span]:
        first, last = bisect.bisect_left(self._starts, start), bisect.bisect_left(self._starts, end)
        step, spans = self.size - self.overlap, []
        for i in range(first, last, step):
            j = min(i + self.size, last)
            spans.append(_Span(self._starts[i], self._ends[j - 1], j - i))
            if j == last:
                break
        return spans

    def _split_by(self, pattern: re.Pattern[str], start: int, end: int) -> list[_Span]:
        spans, at = [], start
        for match in pattern.finditer(self._text, start, end):
            if (span := self._span(at, match.start())) is not None:
                spans.append(span)
            at = match.end()
        if (span := self._span(at, end)) is not None:
            spans.append(span)
        return spans

    def _sentences(self, start: int, end: int) -> list[_Span]:
        return self._split_by(_SENTENCE_END, start, end)

    def _fit(self, units: list[_Span]) -> list[_Span]:
        """Units no longer than `size`: a longer one becomes FIXED windows."""
        out: list[_Span] = []
        for unit in units:
            out += self._fixed(unit.start, unit.end) if unit.tokens > self.size else [unit]
        return out

    def _recursive_units(self, start: int, end: int) -> list[_Span]:
        units: list[_Span] = []
        for paragraph in self._split_by(_PARAGRAPH_BREAK, start, end):
            if paragraph.tokens <= self.size:
                units.append(paragraph)
            else:
                units += self._fit(self._sentences(paragraph.start, paragraph.end))
        return units

    def _pack(self, units: Sequence[_Span]) -> list[_Span]:
        """Consecutive units joined up to `size` tokens; a new chunk repeats the previous one's
        trailing units that fit in `overlap` tokens (never all of them)."""
        chunks: list[_Span] = []
        current: list[_Span] = []
        for unit in units:
            if current and self._tokens(current[0].start, unit.end) > self.size:
                chunks.append(self._join(current))
                carry: list[_Span] = []
                for previous in reversed(current[1:]):
                    if self._tokens(previous.start, unit.end) > self.size or \
                            self._tokens(previous.start, current[-1].end) > self.overlap:
                        break
                    carry.insert(0, previous)
                current = carry
            current.append(unit)
        if current:
            chunks.append(self._join(current))
        return chunks

    def _tokens(self, start: int, end: int) -> int:
        return bisect.bisect_left(self._starts, end) - bisect.bisect_left(self._starts, start)

    def _join(self, units: Sequence[_Span]) -> _Span:
        return _Span(units[0].start, units[-1].end, self._tokens(units[0].start, units[-1].end))


def _heading_paths(headings: Sequence[Heading]) -> list[tuple[str, ...]]:
    """For each heading, the path of titles from the outermost enclosing heading down to it."""
    stack: list[Heading] = []
    paths = []
    for heading in headings:
        while stack and stack[-1].level >= heading.level:
            stack.pop()
        stack.append(heading)
        paths.append(tuple(h.title for h in stack))
    return paths


def sentences(text: str) -> list[str]:
    """The sentences of `text` (split where the chunker splits them), stripped, empty ones dropped."""
    out, at = [], 0
    for match in _SENTENCE_END.finditer(text):
        out.append(text[at:match.start()].strip())
        at = match.end()
    out.append(text[at:].strip())
    return [s for s in out if s]


def token_count(text: str) -> int:
    """Tokens of `text` in the MiniLM tokenizer, without special tokens."""
    return len(tokenizer().encode(text, add_special_tokens=False).ids)
