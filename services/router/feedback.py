"""Outcome feedback: which model/arm served each request, and quality scores (from the
RecordFeedback RPC or `llmo.evaluation.v1.scored` events) turned into cost-penalised bandit
rewards and experiment statistics. Blocking SQL: call from a worker thread."""

from __future__ import annotations

import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llmo.core.errors import invalid_argument, not_found
from llmo.router.bandit import BanditStore, cost_penalised_reward
from llmo.router.experiments import ExperimentStore
from llmo.router.store import requests_log

COST_SCALE_MICROS = 10_000
DEFAULT_COST_WEIGHT = 0.5


def record_request(
    engine: Engine,
    *,
    request_id: str,
    tenant: str,
    model: str,
    scope: str,
    arm: str,
    experiment: str,
    cost_micros: int,
    latency_ms: float,
) -> None:
    with engine.begin() as conn:
        exists = conn.execute(sa.select(requests_log.c.request_id).where(requests_log.c.request_id == request_id)).first()
        if exists:
            return
        conn.execute(
            sa.insert(requests_log).values(
                request_id=request_id,
                tenant=tenant,
                model=model,
                scope=scope,
                arm=arm,
                experiment=experiment,
                cost_micros=cost_micros,
                latency_ms=latency_ms,
                created_at=time.time(),
            )
        )


@dataclass(frozen=True)
class FeedbackResult:
    applied: bool
    model: str
    experiment: str
    arm: str
    reward: float


class FeedbackRecorder:
    def __init__(self, engine: Engine, bandit: BanditStore, experiments: ExperimentStore) -> None:
        self.engine = engine
        self.bandit = bandit
        self.experiments = experiments

    def record(self, tenant: str | None, request_id: str, score: float, event_id: str = "") -> FeedbackResult:
        """Apply a quality score to the request's arm. `tenant=None` trusts the stored tenant
        (events from the evaluation service); otherwise the request must belong to `tenant`."""
        if not request_id:
            raise invalid_argument("MISSING_REQUEST_ID", "request_id is required")
        if not 0.0 <= score <= 1.0 or score != score:
            raise invalid_argument("INVALID_SCORE", f"score must be in [0, 1], got {score}")
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(requests_log).where(requests_log.c.request_id == request_id)).mappings().first()
        if row is None or (tenant is not None and row["tenant"] != tenant):
            raise not_found("REQUEST_NOT_FOUND", f"no routed request {request_id!r}", request_id=request_id)
        owner = row["tenant"]
        cost_weight = DEFAULT_COST_WEIGHT
        experiment_id = row["experiment"].removeprefix("experiments/")
        if experiment_id:
            cost_weight = self.experiments.get(owner, experiment_id).cost_weight
        reward = cost_penalised_reward(score, int(row["cost_micros"]), cost_weight, COST_SCALE_MICROS)
        applied = True
        if row["scope"]:
            applied = self.bandit.update(owner, row["scope"], row["arm"], reward, event_id=event_id or f"feedback:{request_id}")
        if applied and experiment_id:
            self.experiments.record_quality(owner, experiment_id, row["arm"], score)
        return FeedbackResult(applied, row["model"], row["experiment"], row["arm"], reward)
