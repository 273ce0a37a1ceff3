"""Semantic response cache: exact hits and embedding-similarity hits, with a TTL, per tenant.

Entries live in one namespace per tenant and lookups only ever search the caller's
namespace, so one tenant's answer is never served to another. A similarity hit also
requires the same scope (model/policy and generation parameters) and the same
conversation before the latest message; only the latest message may differ, and only by
a cosine distance below the threshold.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Encoder = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass
class _Entry:
    exact_key: str
    context_key: str
    vector: np.ndarray | None
    answer: CachedAnswer
    expires_at: float


@dataclass(frozen=True)
class CacheHit:
    answer: CachedAnswer
    kind: str  # "exact" or "semantic"
    similarity: float


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class SemanticCache:
    def __init__(
        self,
        encoder: Encoder | None,
        ttl_s: float = 600.0,
        similarity_threshold: float = 0.95,
        max_entries_per_tenant: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 < similarity_threshold <= 1.0:
            raise ValueError("similarity_threshold must be in (0, 1]")
        self.encoder = encoder
        self.ttl_s = ttl_s
        self.threshold = similarity_threshold
        self.max_entries = max_entries_per_tenant
        self.clock = clock
        self._tenants: dict[str, OrderedDict[str, _Entry]] = {}

    @staticmethod
    def keys(scope: str, messages: Sequence[tuple[str, str]]) -> tuple[str, str, str]:
        """(exact key, context key, latest message text)."""
        exact = _digest([scope, list(messages)])
        context = _digest([scope, list(messages[:-1]), messages[-1][0] if messages else ""])
        latest = messages[-1][1] if messages else ""
        return exact, context, latest

    def _namespace(self, tenant: str) -> OrderedDict[str, _Entry]:
        return self._tenants.setdefault(tenant, OrderedDict())

    def _evict_expired(self, space: OrderedDict[str, _Entry]) -> None:
        now = self.clock()
        for key in [k for k, e in space.items() if e.expires_at <= now]:
            del space[key]

    def lookup(self, tenant: str, scope: str, messages: Sequence[tuple[str, str]]) -> CacheHit | None:
        space = self._tenants.get(tenant)
        if not space or not messages:
            return None
        self._evict_expired(space)
        exact, context, latest = self.keys(scope, messages)
        entry = space.get(exact)
        if entry is not None:
            space.move_to_end(exact)
            return CacheHit(entry.answer, "exact", 1.0)
        if self.encoder is None:
            return None
        same_context = [e for e in space.values() if e.context_key == context and e.vector is not None]
        if not same_context:
            return None
        query = self.encoder([latest])[0]
        sims = np.stack([e.vector for e in same_context if e.vector is not None]) @ query
        best = int(np.argmax(sims))
        if float(sims[best]) >= self.threshold:
            hit = same_context[best]
            space.move_to_end(hit.exact_key)
            return CacheHit(hit.answer, "semantic", float(sims[best]))
        return None

    def store(
        self, tenant: str, scope: str, messages: Sequence[tuple[str, str]], answer: CachedAnswer, *, embed: bool = True
    ) -> None:
        """Add an answer. With `embed=False` only exact lookups find it until `embed_entry()`
        adds its vector (so the exact entry can be stored before the slow embedding)."""
        if not messages:
            return
        exact, context, latest = self.keys(scope, messages)
        vector = self.encoder([latest])[0] if self.encoder is not None and embed else None
        space = self._namespace(tenant)
        space[exact] = _Entry(exact, context, vector, answer, self.clock() + self.ttl_s)
        space.move_to_end(exact)
        while len(space) > self.max_entries:
            space.popitem(last=False)

    def embed_entry(self, tenant: str, scope: str, messages: Sequence[tuple[str, str]]) -> None:
        if self.encoder is None or not messages:
            return
        exact, _, latest = self.keys(scope, messages)
        space = self._tenants.get(tenant)
        entry = space.get(exact) if space is not None else None
        if entry is not None and entry.vector is None:
            entry.vector = self.encoder([latest])[0]

    def size(self, tenant: str) -> int:
        return len(self._tenants.get(tenant, {}))
