"""What a completed event may carry of the text itself (`CompletionContent`), for online evaluation.

Content is user data: services attach it only to a configured, deterministic sample of requests
(`sampled`: a hash of the request id, so the router, inference and every evaluation replica agree
on which requests are in it), and each text is cut to a bound so an event stays small.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from llmo.protos.events.v1 import events_pb2

MAX_CONTENT_CHARS = 16 * 1024
MAX_CONTEXTS = 8


def sampled(key: str, rate: float) -> bool:
    """Whether `key` falls in a sample of share `rate`; the same answer everywhere, every time."""
    if rate >= 1.0:
        return True
    if rate <= 0.0 or not key:
        return False
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def completion_content(input_text: str, output: str, contexts: Sequence[str] = (),
                       limit: int = MAX_CONTENT_CHARS) -> events_pb2.CompletionContent:
    texts = [input_text, output, *contexts[:MAX_CONTEXTS]]
    truncated = len(contexts) > MAX_CONTEXTS or any(len(t) > limit for t in texts)
    return events_pb2.CompletionContent(input=input_text[:limit], output=output[:limit],
                                        contexts=[c[:limit] for c in contexts[:MAX_CONTEXTS]], truncated=truncated)
