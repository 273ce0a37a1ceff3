"""Pure parts of search: access control, metadata filters and fusion of the dense and sparse lists."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import struct_pb2

from llmo.core.errors import invalid_argument
from llmo.core.limits import MAX_LABEL_LEN, preview
from llmo.retrieval.indexes import Hit

MAX_FILTERS = 32
MAX_FILTER_VALUES = 100
DEFAULT_RRF_K = 60
MAX_RRF_K = 10_000

# llmo.retrieval.v1.FilterOperator
EQUAL, NOT_EQUAL, IN, NOT_IN, LT, LTE, GT, GTE, EXISTS = range(1, 10)
_ORDERED = {LT, LTE, GT, GTE}
_MISSING = object()

Predicate = Callable[[dict[str, Any]], bool]


def visible(acl: Sequence[str], principals: frozenset[str]) -> bool:
    """A document is readable by everyone of its tenant when its access list is empty, else by the
    principals it names (the caller's subject or one of its groups)."""
    return not acl or not principals.isdisjoint(acl)


def _scalar(value: struct_pb2.Value, key: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        if not math.isfinite(value.number_value):
            raise invalid_argument("INVALID_FILTER", f"filter on {preview(key)!r}: numbers must be finite", key=preview(key))
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    raise invalid_argument("INVALID_FILTER", f"filter on {preview(key)!r}: values must be numbers, strings or booleans",
                           key=preview(key))


def _lookup(metadata: dict[str, Any], key: str) -> Any:
    value: Any = metadata
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _same_kind(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return True
    return isinstance(a, str) and isinstance(b, str)


def _equal(a: Any, b: Any) -> bool:
    return _same_kind(a, b) and a == b


def _compare(op: int, field: Any, value: Any) -> bool:
    if not _same_kind(field, value) or isinstance(field, bool):
        return False
    if op == LT:
        return bool(field < value)
    if op == LTE:
        return bool(field <= value)
    if op == GT:
        return bool(field > value)
    return bool(field >= value)


def compile_filters(filters: Sequence[Any]) -> Predicate:
    """One predicate over a document's metadata for every filter (AND).

    A list-valued field matches when any element does (tags). A missing field matches only
    NOT_EQUAL and NOT_IN. Ordered comparisons need a number or a string on both sides.
    """
    if len(filters) > MAX_FILTERS:
        raise invalid_argument("INVALID_FILTER", f"at most {MAX_FILTERS} filters", max_filters=MAX_FILTERS)
    predicates = [_compile(f) for f in filters]
    return lambda metadata: all(p(metadata) for p in predicates)


def _compile(flt: Any) -> Predicate:
    key, op = flt.key, int(flt.operator)
    if not key or len(key) > MAX_LABEL_LEN:
        raise invalid_argument("INVALID_FILTER", f"a filter key is 1..{MAX_LABEL_LEN} characters", key=preview(key))
    if not EQUAL <= op <= EXISTS:
        raise invalid_argument("INVALID_FILTER", f"filter on {preview(key)!r}: unknown operator {op}", key=preview(key))
    if len(flt.values) > MAX_FILTER_VALUES:
        raise invalid_argument("INVALID_FILTER", f"filter on {preview(key)!r}: at most {MAX_FILTER_VALUES} values",
                               key=preview(key))
    if op == EXISTS:
        return lambda metadata: _lookup(metadata, key) is not _MISSING
    values = [_scalar(v, key) for v in flt.values]
    if op in (IN, NOT_IN):
        if not values:
            raise invalid_argument("INVALID_FILTER", f"filter on {preview(key)!r}: IN / NOT_IN need values", key=preview(key))
    elif len(values) != 1:
        raise invalid_argument("INVALID_FILTER", f"filter on {preview(key)!r}: the operator takes exactly one value",
                               key=preview(key))
    if op in _ORDERED and isinstance(values[0], bool):
        raise invalid_argument("INVALID_FILTER", f"filter on {preview(key)!r}: booleans have no order", key=preview(key))

    def matches(metadata: dict[str, Any]) -> bool:
        field = _lookup(metadata, key)
        if field is _MISSING:
            return op in (NOT_EQUAL, NOT_IN)
        items = field if isinstance(field, list) else [field]
        if op in _ORDERED:
            return any(_compare(op, item, values[0]) for item in items)
        hit = any(_equal(item, value) for item in items for value in values)
        return not hit if op in (NOT_EQUAL, NOT_IN) else hit

    return matches


@dataclass
class Fused:
    position: int
    score: float = 0.0
    dense_score: float = 0.0
    dense_rank: int = 0
    sparse_score: float = 0.0
    sparse_rank: int = 0


@dataclass(frozen=True)
class Fusion:
    method: int  # llmo.retrieval.v1.FusionMethod: 1 RRF, 2 CONVEX
    rrf_k: int
    dense_weight: float
    sparse_weight: float


RRF, CONVEX = 1, 2


def fusion_of(options: Any) -> Fusion:
    method = int(options.method) or RRF
    if method not in (RRF, CONVEX):
        raise invalid_argument("INVALID_FUSION", f"unknown fusion method {method}")
    if not 0 <= options.rrf_k <= MAX_RRF_K:
        raise invalid_argument("INVALID_FUSION", f"rrf_k must be in 0..{MAX_RRF_K}")
    weights = (options.dense_weight, options.sparse_weight)
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise invalid_argument("INVALID_FUSION", "fusion weights must be finite and >= 0")
    dense, sparse = weights if any(weights) else (1.0, 1.0)
    return Fusion(method, options.rrf_k or DEFAULT_RRF_K, dense, sparse)


def _lists(dense: Sequence[Hit], sparse: Sequence[Hit]) -> dict[int, Fused]:
    out: dict[int, Fused] = {}
    for rank, hit in enumerate(dense, 1):
        out.setdefault(hit.position, Fused(hit.position)).__dict__.update(dense_score=hit.score, dense_rank=rank)
    for rank, hit in enumerate(sparse, 1):
        out.setdefault(hit.position, Fused(hit.position)).__dict__.update(sparse_score=hit.score, sparse_rank=rank)
    return out


def _min_max(hits: Sequence[Hit]) -> dict[int, float]:
    if not hits:
        return {}
    low, high = min(h.score for h in hits), max(h.score for h in hits)
    span = high - low
    return {h.position: (h.score - low) / span if span > 0 else 1.0 for h in hits}


def fuse(dense: Sequence[Hit], sparse: Sequence[Hit], fusion: Fusion) -> list[Fused]:
    """Both lists fused, best first (ties by position, so results are deterministic)."""
    merged = _lists(dense, sparse)
    if fusion.method == RRF:
        for item in merged.values():
            item.score = sum(w / (fusion.rrf_k + rank) for w, rank in
                             ((fusion.dense_weight, item.dense_rank), (fusion.sparse_weight, item.sparse_rank)) if rank)
    else:
        nd, ns = _min_max(dense), _min_max(sparse)
        total = fusion.dense_weight + fusion.sparse_weight
        for item in merged.values():
            item.score = (fusion.dense_weight * nd.get(item.position, 0.0)
                          + fusion.sparse_weight * ns.get(item.position, 0.0)) / total
    return ranked(merged.values())


def single(hits: Iterable[Hit], *, dense: bool) -> list[Fused]:
    out = []
    for rank, hit in enumerate(hits, 1):
        item = Fused(hit.position, hit.score)
        if dense:
            item.dense_score, item.dense_rank = hit.score, rank
        else:
            item.sparse_score, item.sparse_rank = hit.score, rank
        out.append(item)
    return out


def ranked(items: Iterable[Fused]) -> list[Fused]:
    return sorted(items, key=lambda f: (-f.score, f.position))


@dataclass
class Candidate:
    """A fused candidate with the rows read for it; the later stages (rerank, reorder, compression) work on these."""

    fused: Fused
    chunk: Any  # llmo.retrieval.storage.ChunkRow
    document: Any  # llmo.retrieval.storage.DocumentRow
    rerank_score: float = 0.0
    matched_entities: list[str] = field(default_factory=list)
    relations: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def score(self) -> float:
        return self.fused.score


def fuse_lists(lists: Sequence[Sequence[Fused]], rrf_k: int) -> list[Fused]:
    """Several ranked lists (one per query variant) fused by RRF. Each item keeps the dense and sparse
    scores and ranks of the first list it appears in (the original query's when it is there)."""
    if len(lists) == 1:
        return list(lists[0])
    merged: dict[int, Fused] = {}
    totals: dict[int, float] = {}
    for items in lists:
        for rank, item in enumerate(items, 1):
            if item.position not in merged:
                merged[item.position] = Fused(item.position, 0.0, item.dense_score, item.dense_rank,
                                              item.sparse_score, item.sparse_rank)
            totals[item.position] = totals.get(item.position, 0.0) + 1.0 / (rrf_k + rank)
    for position, item in merged.items():
        item.score = totals[position]
    return ranked(merged.values())
