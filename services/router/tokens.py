"""Token counting with a real subword tokenizer (the bundled MiniLM WordPiece vocabulary).

Counts are for budgeting, reports and audits; a provider's own tokenizer may differ by a
few percent, which is why budgets leave headroom.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any


@functools.cache
def _tokenizer() -> Any:
    from tokenizers import Tokenizer

    from llmo.router.learned.embed import model_path

    tok = Tokenizer.from_file(str(model_path() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def count_tokens(text: str) -> int:
    if not text:
        return 0
    return len(_tokenizer().encode(text, add_special_tokens=False).ids)


def count_tokens_batch(texts: Sequence[str]) -> list[int]:
    if not texts:
        return []
    return [len(e.ids) for e in _tokenizer().encode_batch(list(texts), add_special_tokens=False)]


# Per-message framing overhead (role markers, separators) used when counting chat requests.
MESSAGE_OVERHEAD_TOKENS = 4


def count_message_tokens(messages: Sequence[tuple[str, str]]) -> int:
    """Tokens of a chat request given (role, content) pairs."""
    return sum(count_tokens_batch([c for _, c in messages])) + MESSAGE_OVERHEAD_TOKENS * len(messages)
