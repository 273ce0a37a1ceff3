"""Token counting with a real subword tokenizer (the bundled MiniLM WordPiece vocabulary).

Counts are for budgeting, reports and audits; a provider's own tokenizer may differ by a
few percent, which is why budgets leave headroom.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

# WordPiece turns any word longer than this into one [UNK] (and takes seconds to do it for a
# megabyte-long word), so such runs are counted apart: about 4 characters per token for
# ASCII (what BPE tokenizers give for such strings), one per character otherwise.
MAX_WORD_CHARS = 100
_LONG_WORD = re.compile(rf"[^\W_]{{{MAX_WORD_CHARS + 1},}}")


@functools.cache
def _tokenizer() -> Any:
    from tokenizers import Tokenizer

    from llmo.embedding import model_path

    tok = Tokenizer.from_file(str(model_path() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def _split_long_words(text: str) -> tuple[str, int]:
    """(text without its over-long words, the tokens those words count for)."""
    extra = 0

    def cut(match: re.Match[str]) -> str:
        nonlocal extra
        word = match.group()
        extra += math.ceil(len(word) / 4) if word.isascii() else len(word)
        return " "

    return _LONG_WORD.sub(cut, text), extra


def count_tokens(text: str) -> int:
    return count_tokens_batch([text])[0]


def count_tokens_batch(texts: Sequence[str]) -> list[int]:
    if not texts:
        return []
    split = [_split_long_words(t) for t in texts]
    encoded = _tokenizer().encode_batch([t for t, _ in split], add_special_tokens=False)
    return [len(e.ids) + extra for e, (_, extra) in zip(encoded, split, strict=True)]


# Per-message framing overhead (role markers, separators) used when counting chat requests.
MESSAGE_OVERHEAD_TOKENS = 4


def count_message_tokens(messages: Sequence[tuple[str, str]]) -> int:
    """Tokens of a chat request given (role, content) pairs."""
    return sum(count_tokens_batch([c for _, c in messages])) + MESSAGE_OVERHEAD_TOKENS * len(messages)
