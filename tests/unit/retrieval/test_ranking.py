"""Fusion, metadata filters and access control (pure functions)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import struct_pb2

from llmo.core.errors import ServiceError
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.retrieval import ranking
from llmo.retrieval.indexes import Hit


def _f(key: str, op: int, *values: Any) -> pb.MetadataFilter:
    out = pb.MetadataFilter(key=key, operator=op)  # type: ignore[arg-type]
    for v in values:
        value = struct_pb2.Value()
        if isinstance(v, bool):
            value.bool_value = v
        elif isinstance(v, int | float):
            value.number_value = v
        else:
            value.string_value = v
        out.values.append(value)
    return out


DOC = {"year": 2021.0, "team": "eng", "tags": ["a", "b"], "author": {"name": "ann"}, "draft": False}


@pytest.mark.parametrize(("flt", "expected"), [
    (_f("year", pb.FILTER_OPERATOR_EQUAL, 2021), True),
    (_f("year", pb.FILTER_OPERATOR_EQUAL, "2021"), False),
    (_f("team", pb.FILTER_OPERATOR_NOT_EQUAL, "ops"), True),
    (_f("missing", pb.FILTER_OPERATOR_NOT_EQUAL, "x"), True),
    (_f("missing", pb.FILTER_OPERATOR_EQUAL, "x"), False),
    (_f("tags", pb.FILTER_OPERATOR_IN, "b", "z"), True),
    (_f("tags", pb.FILTER_OPERATOR_NOT_IN, "a"), False),
    (_f("year", pb.FILTER_OPERATOR_GREATER_THAN, 2020), True),
    (_f("year", pb.FILTER_OPERATOR_LESS_THAN_OR_EQUAL, 2020), False),
    (_f("team", pb.FILTER_OPERATOR_GREATER_THAN_OR_EQUAL, "dev"), True),
    (_f("team", pb.FILTER_OPERATOR_LESS_THAN, 5), False),
    (_f("author.name", pb.FILTER_OPERATOR_EQUAL, "ann"), True),
    (_f("author", pb.FILTER_OPERATOR_EXISTS), True),
    (_f("draft", pb.FILTER_OPERATOR_EQUAL, 0), False),
    (_f("draft", pb.FILTER_OPERATOR_EQUAL, False), True),
])
def test_filter_operators(flt: pb.MetadataFilter, expected: bool) -> None:
    assert ranking.compile_filters([flt])(DOC) is expected


@pytest.mark.parametrize("flt", [
    _f("", pb.FILTER_OPERATOR_EQUAL, 1), _f("year", 0, 1), _f("year", 42, 1), _f("year", pb.FILTER_OPERATOR_EQUAL),
    _f("year", pb.FILTER_OPERATOR_LESS_THAN, 1, 2), _f("year", pb.FILTER_OPERATOR_IN),
    _f("draft", pb.FILTER_OPERATOR_GREATER_THAN, True), _f("year", pb.FILTER_OPERATOR_EQUAL, float("nan")),
])
def test_invalid_filters_are_refused(flt: pb.MetadataFilter) -> None:
    with pytest.raises(ServiceError) as raised:
        ranking.compile_filters([flt])
    assert raised.value.reason == "INVALID_FILTER"


def test_access_lists() -> None:
    assert ranking.visible([], frozenset())
    assert not ranking.visible(["user:ann"], frozenset())
    assert ranking.visible(["user:ann", "group:eng"], frozenset({"user:bob", "group:eng"}))
    assert not ranking.visible(["group:eng"], frozenset({"user:eng"}))


def test_rrf_sums_weighted_reciprocal_ranks() -> None:
    dense, sparse = [Hit(1, 0.9), Hit(2, 0.5)], [Hit(2, 7.0), Hit(3, 3.0)]
    fused = ranking.fuse(dense, sparse, ranking.Fusion(ranking.RRF, 60, 1.0, 2.0))
    scores = {f.position: f.score for f in fused}
    assert scores[2] == pytest.approx(1 / 62 + 2 / 61) and scores[1] == pytest.approx(1 / 61)
    assert scores[3] == pytest.approx(2 / 62) and [f.position for f in fused] == [2, 3, 1]
    two = next(f for f in fused if f.position == 2)
    assert (two.dense_rank, two.sparse_rank, two.dense_score, two.sparse_score) == (2, 1, 0.5, 7.0)


def test_convex_combines_min_max_normalised_scores() -> None:
    dense, sparse = [Hit(1, 0.9), Hit(2, 0.5), Hit(4, 0.1)], [Hit(2, 8.0), Hit(3, 4.0)]
    fused = ranking.fuse(dense, sparse, ranking.Fusion(ranking.CONVEX, 60, 3.0, 1.0))
    scores = {f.position: f.score for f in fused}
    assert scores[1] == pytest.approx(3 * 1.0 / 4) and scores[2] == pytest.approx((3 * 0.5 + 1.0) / 4)
    assert scores[3] == pytest.approx(0.0) and scores[4] == pytest.approx(0.0)
    assert [f.position for f in fused][:2] == [1, 2]


def test_fusion_options_defaults_and_bounds() -> None:
    assert ranking.fusion_of(pb.FusionOptions()) == ranking.Fusion(ranking.RRF, 60, 1.0, 1.0)
    for bad in (pb.FusionOptions(rrf_k=-1), pb.FusionOptions(dense_weight=float("inf")), pb.FusionOptions(method=9)):
        with pytest.raises(ServiceError) as raised:
            ranking.fusion_of(bad)
        assert raised.value.reason == "INVALID_FUSION"
