"""Cheap, model-free text features that hint at how hard a prompt is."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

_OPTION = re.compile(r"^\s*[A-J][.)]\s+(.*)$", re.MULTILINE)
_WORD = re.compile(r"\w+")
_MATH = re.compile(r"[=+\-*/^<>%$\\×÷√∑∫]")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_NEGATION = re.compile(r"\b(NOT|EXCEPT|LEAST|FALSE|incorrect)\b")
_STATEMENT = re.compile(r"\bStatement\s+\d", re.IGNORECASE)
_CODE = re.compile(r"[{};]|def |return |print\(|int |void ")

FEATURE_NAMES: tuple[str, ...] = (
    "log_chars",
    "log_words",
    "log_lines",
    "digit_share",
    "log_numbers",
    "math_symbol_share",
    "negation",
    "statements",
    "code_like",
    "n_options",
    "log_mean_option_chars",
    "log_max_option_chars",
    "mean_word_len",
    "upper_share",
    "type_token_ratio",
    "question_marks",
)


def text_features(text: str) -> list[float]:
    n = max(len(text), 1)
    words = _WORD.findall(text)
    options = _OPTION.findall(text)
    option_lens = [len(o) for o in options] or [0]
    unique = len({w.lower() for w in words})
    return [
        math.log1p(len(text)),
        math.log1p(len(words)),
        math.log1p(text.count("\n")),
        sum(c.isdigit() for c in text) / n,
        math.log1p(len(_NUMBER.findall(text))),
        len(_MATH.findall(text)) / n,
        float(len(_NEGATION.findall(text))),
        float(len(_STATEMENT.findall(text))),
        float(bool(_CODE.search(text))),
        float(len(options)),
        math.log1p(sum(option_lens) / len(option_lens)),
        math.log1p(max(option_lens)),
        (sum(len(w) for w in words) / len(words)) if words else 0.0,
        sum(c.isupper() for c in text) / n,
        unique / len(words) if words else 0.0,
        float(text.count("?")),
    ]


def option_texts(text: str) -> list[str]:
    """The answer options ("A. ...", "B) ...") of a multiple-choice prompt, in order."""
    return _OPTION.findall(text)


def feature_matrix(texts: Sequence[str]) -> np.ndarray:
    return np.array([text_features(t) for t in texts], dtype=np.float32).reshape(len(texts), len(FEATURE_NAMES))
