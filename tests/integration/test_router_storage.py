"""Router state on both SQL backends (SQLite file and PostgreSQL), through the migrations."""

from __future__ import annotations

import pytest

from llmo.core.errors import ServiceError
from llmo.router.bandit import BanditStore
from llmo.router.experiments import BANDIT, FIXED_SPLIT, Arm, ExperimentStore
from llmo.router.feedback import FeedbackRecorder, record_request
from llmo.router.prompts import PromptRegistry
from llmo.router.store import open_store


def test_router_state_round_trips(database_url: str) -> None:
    engine = open_store(database_url)
    try:
        bandit = BanditStore(engine)
        experiments = ExperimentStore(engine, bandit)
        prompts = PromptRegistry(engine)

        prompts.create_template("acme", "qa", "questions")
        v = prompts.create_version("acme", "qa", "Answer {{q}} politely.", ["production"])
        assert prompts.render("acme", "qa", {"q": "why"})[0] == "Answer why politely."
        assert v.token_count > 0
        with pytest.raises(ServiceError):
            prompts.get_template("globex", "qa")

        exp = experiments.create("acme", "e1", FIXED_SPLIT, [Arm("a", "small"), Arm("b", "big", "promptTemplates/qa/versions/1")], 0.5)
        assert [a.arm for a in exp.arms] == ["a", "b"]
        _, arm1, _ = experiments.assign("acme", "e1", "user-7")
        _, arm2, _ = experiments.assign("acme", "e1", "user-7")
        assert arm1 == arm2
        experiments.create("acme", "e2", BANDIT, [Arm("x", "small"), Arm("y", "big")], 1.0)
        _, arm, reason = experiments.assign("acme", "e2", "u")
        assert arm.arm in {"x", "y"} and "Thompson" in reason

        record_request(
            engine, request_id="r1", tenant="acme", model="big", scope=experiments.scope("e2"), arm=arm.arm,
            experiment="experiments/e2", cost_micros=100, latency_ms=12.5,
        )
        experiments.record_request("acme", "e2", arm.arm, 100, 12.5)
        result = FeedbackRecorder(engine, bandit, experiments).record("acme", "r1", 0.8, "ev-1")
        assert result.applied and result.reward == pytest.approx(0.8 - 1.0 * 100 / 10_000)
        again = FeedbackRecorder(engine, bandit, experiments).record("acme", "r1", 0.8, "ev-1")
        assert not again.applied
        stats = {s.arm: s for s in experiments.get("acme", "e2").stats}
        assert stats[arm.arm].requests == 1 and stats[arm.arm].feedback_count == 1
        assert stats[arm.arm].mean_quality == pytest.approx(0.8)
        state = bandit.states("acme", experiments.scope("e2"), [arm.arm])[arm.arm]
        assert state.pulls == 1
    finally:
        engine.dispose()
    # Reopening runs the migrations again as a no-op and finds the state.
    engine = open_store(database_url)
    try:
        assert PromptRegistry(engine).resolve("acme", "qa").version == 1
    finally:
        engine.dispose()
