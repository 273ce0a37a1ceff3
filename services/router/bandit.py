"""Thompson sampling over arms (model x prompt version) with cost-penalised rewards.

Each (tenant, scope, arm) keeps a Beta(alpha, beta) posterior over "this arm gives a good
answer". A reward is `quality - cost_weight * cost_share` clipped to [0, 1], where
`cost_share` is the request's cost relative to `cost_scale_micros`; fractional rewards
update the posterior as alpha += r, beta += 1 - r. State lives in SQL so it survives
restarts and is never shared between tenants.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llmo.router.store import bandit_arms, processed_events


@dataclass(frozen=True)
class ArmState:
    arm: str
    alpha: float
    beta: float
    pulls: int
    reward_sum: float

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)


@dataclass(frozen=True)
class Choice:
    arm: str
    samples: dict[str, float]
    states: dict[str, ArmState]


def cost_penalised_reward(quality: float, cost_micros: int, cost_weight: float, cost_scale_micros: int) -> float:
    if not 0.0 <= quality <= 1.0:
        raise ValueError(f"quality must be in [0, 1], got {quality}")
    penalty = cost_weight * (cost_micros / cost_scale_micros) if cost_scale_micros > 0 else 0.0
    return min(1.0, max(0.0, quality - penalty))


class BanditStore:
    """Blocking SQL access; call from a worker thread in async code."""

    def __init__(self, engine: Engine, rng: random.Random | None = None) -> None:
        self.engine = engine
        self.rng = rng or random.Random()

    def states(self, tenant: str, scope: str, arms: Sequence[str]) -> dict[str, ArmState]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(bandit_arms).where(bandit_arms.c.tenant == tenant, bandit_arms.c.scope == scope)
            ).mappings()
            known = {
                r["arm"]: ArmState(r["arm"], r["alpha"], r["beta"], r["pulls"], r["reward_sum"]) for r in rows
            }
        return {a: known.get(a, ArmState(a, 1.0, 1.0, 0, 0.0)) for a in arms}

    def choose(self, tenant: str, scope: str, arms: Sequence[str]) -> Choice:
        if not arms:
            raise ValueError("no arms to choose from")
        states = self.states(tenant, scope, arms)
        samples = {a: self.rng.betavariate(s.alpha, s.beta) for a, s in states.items()}
        best = max(arms, key=lambda a: samples[a])
        return Choice(arm=best, samples=samples, states=states)

    def update(self, tenant: str, scope: str, arm: str, reward: float, event_id: str | None = None) -> bool:
        """Apply one reward; with `event_id`, a redelivered event is applied only once."""
        if not 0.0 <= reward <= 1.0:
            raise ValueError(f"reward must be in [0, 1], got {reward}")
        now = time.time()
        with self.engine.begin() as conn:
            if event_id is not None:
                seen = conn.execute(
                    sa.select(processed_events.c.event_id).where(processed_events.c.event_id == event_id)
                ).first()
                if seen is not None:
                    return False
                conn.execute(sa.insert(processed_events).values(event_id=event_id, processed_at=now))
            key = (bandit_arms.c.tenant == tenant) & (bandit_arms.c.scope == scope) & (bandit_arms.c.arm == arm)
            row = conn.execute(sa.select(bandit_arms.c.arm).where(key)).first()
            if row is None:
                conn.execute(
                    sa.insert(bandit_arms).values(
                        tenant=tenant,
                        scope=scope,
                        arm=arm,
                        alpha=1.0 + reward,
                        beta=2.0 - reward,
                        pulls=1,
                        rewards=1,
                        reward_sum=reward,
                        updated_at=now,
                    )
                )
            else:
                conn.execute(
                    sa.update(bandit_arms)
                    .where(key)
                    .values(
                        alpha=bandit_arms.c.alpha + reward,
                        beta=bandit_arms.c.beta + (1.0 - reward),
                        pulls=bandit_arms.c.pulls + 1,
                        rewards=bandit_arms.c.rewards + 1,
                        reward_sum=bandit_arms.c.reward_sum + reward,
                        updated_at=now,
                    )
                )
        return True
