"""A/B experiments over arms (model x prompt version): fixed splits that are sticky per
user (a stable hash of experiment and user picks the arm) or Thompson-sampling bandit
allocation; per-arm request, cost, latency and quality statistics.

Blocking SQL: call from a worker thread in async code.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llmo.core.errors import already_exists, failed_precondition, invalid_argument, not_found
from llmo.router.bandit import BanditStore
from llmo.router.store import experiment_stats, experiments

RESOURCE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
FIXED_SPLIT = "fixed_split"
BANDIT = "bandit"
_SEP = "/"


@dataclass(frozen=True)
class Arm:
    arm: str
    model: str
    prompt_version: str = ""
    weight: float = 1.0


@dataclass(frozen=True)
class ArmStat:
    arm: str
    requests: int
    feedback_count: int
    mean_quality: float
    cost_micros: int
    mean_latency_ms: float


@dataclass(frozen=True)
class ExperimentInfo:
    experiment_id: str
    allocation: str
    arms: list[Arm]
    cost_weight: float
    active: bool
    created_at: float
    stats: list[ArmStat]

    @property
    def name(self) -> str:
        return f"experiments/{self.experiment_id}"

    def arm(self, name: str) -> Arm | None:
        return next((a for a in self.arms if a.arm == name), None)


def parse_experiment_name(name: str) -> str:
    prefix = "experiments/"
    eid = name[len(prefix) :] if name.startswith(prefix) else ""
    if not RESOURCE_ID.match(eid):
        raise invalid_argument("INVALID_NAME", f"expected experiments/{{id}}, got {name!r}", name=name)
    return eid


def sticky_bucket(experiment_id: str, user: str) -> float:
    """A stable number in [0, 1) for (experiment, user)."""
    digest = hashlib.sha256(f"{experiment_id}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick_fixed(arms: list[Arm], bucket: float) -> Arm:
    total = sum(a.weight for a in arms)
    edge = 0.0
    for arm in arms:
        edge += arm.weight / total
        if bucket < edge:
            return arm
    return arms[-1]


class ExperimentStore:
    def __init__(self, engine: Engine, bandit: BanditStore) -> None:
        self.engine = engine
        self.bandit = bandit

    @staticmethod
    def _key(tenant: str, experiment_id: str) -> str:
        return f"{tenant}{_SEP}{experiment_id}"

    def create(
        self, tenant: str, experiment_id: str, allocation: str, arms: list[Arm], cost_weight: float
    ) -> ExperimentInfo:
        if not RESOURCE_ID.match(experiment_id):
            raise invalid_argument("INVALID_ID", f"experiment id must match {RESOURCE_ID.pattern}", id=experiment_id)
        if allocation not in (FIXED_SPLIT, BANDIT):
            raise invalid_argument("INVALID_ALLOCATION", "allocation must be FIXED_SPLIT or BANDIT")
        if len(arms) < 2:
            raise invalid_argument("TOO_FEW_ARMS", "an experiment needs at least two arms")
        names = [a.arm for a in arms]
        if len(set(names)) != len(names) or any(not n for n in names):
            raise invalid_argument("DUPLICATE_ARM", "arm names must be unique and non-empty")
        if any(not a.weight > 0 for a in arms) or cost_weight < 0:
            raise invalid_argument("INVALID_WEIGHT", "arm weights must be > 0 and cost_weight >= 0")
        key = self._key(tenant, experiment_id)
        with self.engine.begin() as conn:
            if conn.execute(sa.select(experiments.c.name).where(experiments.c.name == key)).first():
                raise already_exists("EXPERIMENT_EXISTS", f"experiments/{experiment_id} already exists")
            conn.execute(
                sa.insert(experiments).values(
                    name=key,
                    allocation=allocation,
                    arms=[a.__dict__ for a in arms],
                    cost_weight=cost_weight,
                    active=True,
                    created_at=time.time(),
                )
            )
            for a in arms:
                conn.execute(
                    sa.insert(experiment_stats).values(
                        experiment=key,
                        arm=a.arm,
                        requests=0,
                        cost_micros=0,
                        latency_ms_sum=0.0,
                        feedback_count=0,
                        quality_sum=0.0,
                    )
                )
        return self.get(tenant, experiment_id)

    def get(self, tenant: str, experiment_id: str) -> ExperimentInfo:
        key = self._key(tenant, experiment_id)
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(experiments).where(experiments.c.name == key)).mappings().first()
            if row is None:
                raise not_found("EXPERIMENT_NOT_FOUND", f"experiments/{experiment_id} not found")
            stats_rows = conn.execute(
                sa.select(experiment_stats).where(experiment_stats.c.experiment == key)
            ).mappings()
            stats = {
                s["arm"]: ArmStat(
                    arm=s["arm"],
                    requests=s["requests"],
                    feedback_count=s["feedback_count"],
                    mean_quality=s["quality_sum"] / s["feedback_count"] if s["feedback_count"] else 0.0,
                    cost_micros=int(s["cost_micros"]),
                    mean_latency_ms=s["latency_ms_sum"] / s["requests"] if s["requests"] else 0.0,
                )
                for s in stats_rows
            }
        arms = [Arm(**a) for a in row["arms"]]
        return ExperimentInfo(
            experiment_id=experiment_id,
            allocation=row["allocation"],
            arms=arms,
            cost_weight=row["cost_weight"],
            active=bool(row["active"]),
            created_at=row["created_at"],
            stats=[stats[a.arm] for a in arms if a.arm in stats],
        )

    def list(self, tenant: str, after: str, limit: int) -> list[ExperimentInfo]:
        prefix = f"{tenant}{_SEP}"
        with self.engine.connect() as conn:
            keys = list(
                conn.execute(
                    sa.select(experiments.c.name)
                    .where(experiments.c.name.startswith(prefix, autoescape=True))
                    .where(experiments.c.name > prefix + after)
                    .order_by(experiments.c.name)
                    .limit(limit)
                ).scalars()
            )
        return [self.get(tenant, k[len(prefix) :]) for k in keys]

    def stop(self, tenant: str, experiment_id: str) -> ExperimentInfo:
        self.get(tenant, experiment_id)
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(experiments).where(experiments.c.name == self._key(tenant, experiment_id)).values(active=False)
            )
        return self.get(tenant, experiment_id)

    def scope(self, experiment_id: str) -> str:
        return f"experiment:{experiment_id}"

    def assign(self, tenant: str, experiment_id: str, user: str) -> tuple[ExperimentInfo, Arm, str]:
        """The arm for this request and a one-line explanation."""
        info = self.get(tenant, experiment_id)
        if not info.active:
            raise failed_precondition("EXPERIMENT_STOPPED", f"experiments/{experiment_id} is stopped")
        if info.allocation == FIXED_SPLIT:
            bucket = sticky_bucket(experiment_id, user or "anonymous")
            arm = pick_fixed(info.arms, bucket)
            return info, arm, f"fixed split: user bucket {bucket:.3f} -> arm {arm.arm}"
        choice = self.bandit.choose(tenant, self.scope(experiment_id), [a.arm for a in info.arms])
        arm = next(a for a in info.arms if a.arm == choice.arm)
        sample = choice.samples[arm.arm]
        return info, arm, f"bandit: Thompson sample {sample:.3f} highest for arm {arm.arm}"

    def record_request(self, tenant: str, experiment_id: str, arm: str, cost_micros: int, latency_ms: float) -> None:
        where = (experiment_stats.c.experiment == self._key(tenant, experiment_id)) & (experiment_stats.c.arm == arm)
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(experiment_stats)
                .where(where)
                .values(
                    requests=experiment_stats.c.requests + 1,
                    cost_micros=experiment_stats.c.cost_micros + cost_micros,
                    latency_ms_sum=experiment_stats.c.latency_ms_sum + latency_ms,
                )
            )

    def record_quality(self, tenant: str, experiment_id: str, arm: str, score: float) -> None:
        where = (experiment_stats.c.experiment == self._key(tenant, experiment_id)) & (experiment_stats.c.arm == arm)
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(experiment_stats)
                .where(where)
                .values(
                    feedback_count=experiment_stats.c.feedback_count + 1,
                    quality_sum=experiment_stats.c.quality_sum + score,
                )
            )
