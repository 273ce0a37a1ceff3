"""The router counts an upstream's prefix-cache hits apart from input tokens, the way the
inference service's own usage event of the same call does, so the ledger bills one call the
same whichever of the two events it records (issue 13, found by scripts/trust_probe.py #6)."""

from __future__ import annotations

import json

from llmo.router.providers.base import Usage
from llmo.router.providers.openai_http import parse_completion


def test_cached_tokens_are_read_from_prompt_tokens_details() -> None:
    body = {
        "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 28, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 16}},
    }
    chunk = parse_completion(json.dumps(body).encode())
    assert chunk.usage == Usage(28, 4, 16)
    assert chunk.usage.uncached_prompt_tokens == 12


def test_an_upstream_without_details_has_no_cached_tokens() -> None:
    body = {"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 7, "completion_tokens": 1}}
    chunk = parse_completion(json.dumps(body).encode())
    assert chunk.usage == Usage(7, 1, 0) and chunk.usage.uncached_prompt_tokens == 7
