"""Tokenizer wrapper (tokenizer.json + chat template) and UTF-8-safe incremental detokenization."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from llmo.inference.models.config import ModelLoadError

REPLACEMENT = "\ufffd"


def _raise(message: str) -> None:
    raise TemplateError(message)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return str(value.get("content")) if value.get("content") is not None else None
    return str(value) if value is not None else None


class ChatTemplateError(ValueError):
    """The messages cannot be rendered with the model's chat template."""


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any]) -> None:
        self.tokenizer = tokenizer
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        template = config.get("chat_template")
        if isinstance(template, list):
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(template) if template else None
        self.eos_token_id = tokenizer.token_to_id(self.eos_token) if self.eos_token else None

    @classmethod
    def from_dir(cls, path: Path) -> TextTokenizer:
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ModelLoadError(f"missing tokenizer.json in {path}")
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            config["chat_template"] = template_file.read_text()
        return cls(Tokenizer.from_file(str(file)), config)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest token's vocabulary string, in characters: no token covers more text than that
        (byte-level strings have one character per byte, byte-fallback tokens are longer than their byte)."""
        return max((len(token) for token in self.tokenizer.get_vocab(with_added_tokens=True)), default=1) or 1

    def min_tokens(self, num_chars: int) -> int:
        """A lower bound on the tokens of `num_chars` characters of text, without tokenizing it. The
        factor 4 leaves room for a normalizer composing characters (e + combining accent -> é)."""
        return num_chars // (4 * self.max_token_chars)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str:
        return str(self.tokenizer.id_to_token(token_id) or "")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; use the completions API")
        try:
            return str(self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            ))
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        # The rendered template already carries any BOS text, so no special tokens are added again.
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


@dataclass
class IncrementalDetokenizer:
    """Turns a growing token list into text deltas without splitting a multi-byte character.

    Decodes a short window (`prefix_offset:`) rather than the whole sequence, and holds
    text back while it ends in an incomplete UTF-8 sequence (rendered as U+FFFD).
    """

    tokenizer: TextTokenizer
    skip_special_tokens: bool = True
    tokens: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0

    def prime(self, prompt_ids: list[int]) -> None:
        # A few prompt tokens as left context make leading-space handling match a full decode.
        tail = prompt_ids[-5:]
        self.tokens = list(tail)
        self.prefix_offset = 0
        self.read_offset = len(tail)

    def add(self, token_id: int) -> str:
        self.tokens.append(token_id)
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full = self.tokenizer.decode(self.tokens[self.prefix_offset:], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end of generation)."""
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full = self.tokenizer.decode(self.tokens[self.prefix_offset:], self.skip_special_tokens)
        self.prefix_offset = self.read_offset = len(self.tokens)
        return full[len(prefix):] if len(full) > len(prefix) else ""
