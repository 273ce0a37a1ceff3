"""Scoring one case with several metrics: what Evaluate, runs, reliability and online scoring share.

`resolve` turns a request's MetricSpecs into `ResolvedMetric`s (published rubrics looked up, metric
names fixed and checked for duplicates); `score_case` scores every metric of a case concurrently and
keeps each metric's failure apart, so one judge that times out never loses the other scores.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmo.core.errors import invalid_argument, not_found
from llmo.core.limits import preview
from llmo.core.resources import RESOURCE_ID
from llmo.evaluation.scoring import Case, MetricError, Scorer, Spent, metric_name
from llmo.evaluation.storage import EvaluationStore
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb

MAX_SAMPLES = 20


@dataclass(frozen=True)
class ResolvedMetric:
    spec: pb.MetricSpec
    name: str
    rubric: pb.Rubric | None = None
    rubric_version: str = ""  # rubrics/{id}@{version} of a published rubric


@dataclass
class CaseScores:
    results: list[pb.MetricResult] = field(default_factory=list)
    errors: dict[str, MetricError] = field(default_factory=dict)
    spent: Spent = field(default_factory=Spent)


class StoredSteps:
    """The G-Eval evaluation steps of each rubric content, generated once and kept in the store."""

    def __init__(self, store: EvaluationStore) -> None:
        self.store = store

    async def get(self, tenant: str, rubric_hash: str) -> list[str] | None:
        return await asyncio.to_thread(self.store.get_steps, tenant, rubric_hash)

    async def put(self, tenant: str, rubric_hash: str, steps: list[str]) -> None:
        await asyncio.to_thread(self.store.put_steps, tenant, rubric_hash, steps)


def check_judge(judge: pb.JudgeConfig, field_name: str = "judge") -> None:
    if not 0 <= judge.samples <= MAX_SAMPLES:
        raise invalid_argument("INVALID_JUDGE_CONFIG", f"{field_name}.samples must be in 0..{MAX_SAMPLES}",
                               field=f"{field_name}.samples")
    if not (math.isfinite(judge.temperature) and 0.0 <= judge.temperature <= 2.0):
        raise invalid_argument("INVALID_JUDGE_CONFIG", f"{field_name}.temperature must be in [0, 2]",
                               field=f"{field_name}.temperature")
    if len(judge.model) > 256:
        raise invalid_argument("INVALID_JUDGE_CONFIG", f"{field_name}.model is longer than 256 characters",
                               field=f"{field_name}.model")


def parse_rubric_ref(ref: str) -> tuple[str, int]:
    """`rubrics/{id}` (version 0: the latest) or `rubrics/{id}@{version}`."""
    prefix, _, rest = ref.partition("/")
    rubric_id, at, version = rest.partition("@")
    if prefix != "rubrics" or not RESOURCE_ID.match(rubric_id) or (at and not (version.isdigit() and int(version) > 0)):
        raise invalid_argument("INVALID_NAME", f"expected rubrics/{{rubric}} or rubrics/{{rubric}}@{{version}}; got "
                               f"{preview(ref)!r}", name=preview(ref))
    return rubric_id, int(version) if at else 0


async def resolve(store: EvaluationStore, tenant: str, specs: Sequence[pb.MetricSpec]) -> list[ResolvedMetric]:
    """Specs validated by `scoring.validate_specs` first; NOT_FOUND RUBRIC_NOT_FOUND for an unknown
    rubric reference, INVALID_ARGUMENT DUPLICATE_METRIC when two specs would report one name."""
    resolved = []
    for spec in specs:
        if spec.metric == pb.METRIC_G_EVAL and spec.rubric_ref:
            rubric_id, version = parse_rubric_ref(spec.rubric_ref)
            row = await asyncio.to_thread(store.get_rubric, tenant, rubric_id, version)
            if row is None:
                raise not_found("RUBRIC_NOT_FOUND", f"no rubric {spec.rubric_ref}", rubric=spec.rubric_ref)
            rubric = pb.Rubric.FromString(row.body)
            name = metric_name(spec, rubric.name or rubric_id)
            resolved.append(ResolvedMetric(spec, name, rubric, f"rubrics/{rubric_id}@{row.version}"))
        elif spec.metric == pb.METRIC_G_EVAL:
            resolved.append(ResolvedMetric(spec, metric_name(spec, spec.rubric.name), spec.rubric))
        else:
            resolved.append(ResolvedMetric(spec, metric_name(spec)))
    names = [m.name for m in resolved]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise invalid_argument("DUPLICATE_METRIC", f"two metrics would both report {duplicates[0]!r}",
                               metric=duplicates[0])
    return resolved


async def score_case(scorer: Scorer, case: Case, metrics: Sequence[ResolvedMetric], judge: pb.JudgeConfig, *,
                     tenant: str, request_id: str = "", steps: StoredSteps | None = None,
                     repeat: int = 0) -> CaseScores:
    async def one(metric: ResolvedMetric) -> tuple[pb.MetricResult, Spent]:
        return await scorer.score(case, metric.spec, judge, tenant=tenant, request_id=request_id,
                                  rubric=metric.rubric, rubric_name=metric.rubric.name if metric.rubric else "",
                                  rubric_version=metric.rubric_version, repeat=repeat, step_store=steps)

    outcomes = await asyncio.gather(*(one(m) for m in metrics), return_exceptions=True)
    scores = CaseScores()
    for metric, outcome in zip(metrics, outcomes, strict=True):
        if isinstance(outcome, MetricError):
            scores.errors[metric.name] = outcome
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            result, spent = outcome
            scores.results.append(result)
            scores.spent.add(spent)
    return scores
