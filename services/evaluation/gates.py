"""Quality gates: conditions on a run's metric summaries, checked on the lower CI bound by default.

A condition reads one aggregate of one metric's summary (mean, p10, min, pass rate or the lower
bound of the 95% CI of the mean) and compares it with a threshold in [0, 1]. A gate passes when
every condition holds. A condition naming a metric the run did not compute fails the check with
METRIC_NOT_IN_RUN: a gate that silently passes on a missing metric would let a release through.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from llmo.core.errors import failed_precondition, invalid_argument
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb

MAX_CONDITIONS = 32


def validate_conditions(conditions: Sequence[pb.GateCondition]) -> None:
    if not conditions:
        raise invalid_argument("NO_CONDITIONS", "a gate needs at least one condition")
    if len(conditions) > MAX_CONDITIONS:
        raise invalid_argument("INVALID_CONDITION", f"at most {MAX_CONDITIONS} conditions", field="conditions")
    for i, c in enumerate(conditions):
        field = f"conditions[{i}]"
        if not c.metric or len(c.metric) > 128:
            raise invalid_argument("INVALID_CONDITION", f"{field}.metric must name a metric (1..128 characters)",
                                   field=f"{field}.metric")
        if c.aggregation not in pb.Aggregation.values() or c.aggregation == pb.AGGREGATION_UNSPECIFIED:
            raise invalid_argument("INVALID_CONDITION", f"{field}.aggregation must be set", field=f"{field}.aggregation")
        if c.comparator not in pb.Comparator.values() or c.comparator == pb.COMPARATOR_UNSPECIFIED:
            raise invalid_argument("INVALID_CONDITION", f"{field}.comparator must be set", field=f"{field}.comparator")
        if not (math.isfinite(c.threshold) and 0.0 <= c.threshold <= 1.0):
            raise invalid_argument("INVALID_CONDITION", f"{field}.threshold must be in [0, 1]", field=f"{field}.threshold")


def observed(summary: pb.MetricSummary, aggregation: int) -> float:
    values: dict[int, float] = {
        pb.AGGREGATION_MEAN: summary.mean,
        pb.AGGREGATION_P10: summary.p10,
        pb.AGGREGATION_MIN: summary.min,
        pb.AGGREGATION_PASS_RATE: summary.pass_rate,
        pb.AGGREGATION_CI_LOW: summary.ci_low,
    }
    return values[aggregation]


def check(gate_name: str, conditions: Sequence[pb.GateCondition],
          summaries: Sequence[pb.MetricSummary]) -> pb.GateResult:
    """The gate's outcome on a run's summaries; FAILED_PRECONDITION METRIC_NOT_IN_RUN for a metric it lacks."""
    by_metric = {s.metric: s for s in summaries}
    result = pb.GateResult(gate=gate_name, passed=True)
    for condition in conditions:
        summary = by_metric.get(condition.metric)
        if summary is None or summary.count == 0:
            raise failed_precondition("METRIC_NOT_IN_RUN", f"the run has no scores for {condition.metric!r}",
                                      metric=condition.metric, gate=gate_name)
        value = observed(summary, condition.aggregation)
        if condition.comparator == pb.COMPARATOR_GREATER_THAN_OR_EQUAL:
            passed = value >= condition.threshold
        else:
            passed = value <= condition.threshold
        result.conditions.append(pb.GateConditionResult(condition=condition, observed=value, passed=passed))
        result.passed = result.passed and passed
    return result
