"""The gateway against a REAL misbehaving OpenAI-compatible HTTP server."""

from __future__ import annotations

import grpc
import pytest
from sqlalchemy.engine import Engine

from llmo.core.errors import ServiceError
from llmo.router.fake_backend import FakeBackend
from llmo.router.resilience import BreakerState

from .gw_helpers import collect, load, make_gateway, portfolio_yaml, user

EXPECTED_BACKUP = "".join(f"backup-w{i} " for i in range(6))


async def test_healthy_provider_streams_the_answer(engine: Engine, backend: FakeBackend) -> None:
    gw = make_gateway(engine, load(portfolio_yaml(backend.base_url)))
    started, text, fin = await collect(gw, user("hi", model="small"))
    assert started.decision.model.name == "small"
    assert text == "".join(f"small-w{i} " for i in range(6))
    assert fin.finish_reason == "stop" and fin.fallbacks == 0 and fin.model == "small"
    assert fin.usage.completion_tokens == 6
    assert fin.cost_micros == gw.portfolio.model("small").cost_micros(fin.usage.prompt_tokens, 6)  # type: ignore[union-attr]
    await gw.close()


@pytest.mark.parametrize("behaviour", ["error", "hang_first"])
async def test_failure_before_first_token_falls_back(engine: Engine, backend: FakeBackend, behaviour: str) -> None:
    backend.behaviours["small"] = behaviour
    gw = make_gateway(engine, load(portfolio_yaml(backend.base_url)))
    _, text, fin = await collect(gw, user("hi", model="small"))
    assert text == EXPECTED_BACKUP
    assert fin.model == "backup" and fin.fallbacks == 1 and fin.finish_reason == "stop"
    await gw.close()


@pytest.mark.parametrize("behaviour", ["garbage", "hang", "truncate"])
async def test_mid_stream_failure_continues_on_fallback_without_breaking_the_stream(
    engine: Engine, backend: FakeBackend, behaviour: str
) -> None:
    backend.behaviours["small"] = behaviour
    gw = make_gateway(engine, load(portfolio_yaml(backend.base_url)))
    _, text, fin = await collect(gw, user("hi", model="small"))
    sent_by_primary = "".join(f"small-w{i} " for i in range(2 if behaviour != "hang" else 1))
    # The client sees what the primary sent, then the fallback's continuation, then one finish.
    assert text == sent_by_primary + EXPECTED_BACKUP
    assert fin.model == "backup" and fin.finish_reason == "stop"
    # The fallback was given the partial answer to continue from.
    last = backend.requests[-1]
    assert last["model"] == "backup"
    assert last["messages"][-1] == {"role": "assistant", "content": sent_by_primary}
    await gw.close()


async def test_breaker_opens_and_stops_calling_a_failing_provider(engine: Engine, backend: FakeBackend) -> None:
    backend.behaviours["small"] = "error"
    gw = make_gateway(engine, load(portfolio_yaml(backend.base_url)))
    for _ in range(4):
        await collect(gw, user("hi", model="small", skip_cache=True))
    # breaker_failures=2: after two failures the primary is no longer called.
    assert backend.calls["small"] == 2
    assert gw.breakers.states()["primary"] == BreakerState.OPEN
    await gw.close()


async def test_retryable_errors_are_retried_on_the_same_provider(engine: Engine, backend: FakeBackend) -> None:
    backend.behaviours["small"] = "flaky"
    gw = make_gateway(engine, load(portfolio_yaml(backend.base_url, primary_retries=2)))
    _, text, fin = await collect(gw, user("hi", model="small"))
    assert fin.model == "small" and fin.fallbacks == 0
    assert backend.calls["small"] == 2
    assert text.startswith("small-w0")
    await gw.close()


async def test_client_errors_are_not_retried_or_fallen_back(engine: Engine, backend: FakeBackend) -> None:
    backend.behaviours["small"] = "reject"
    gw = make_gateway(engine, load(portfolio_yaml(backend.base_url, primary_retries=3)))
    with pytest.raises(ServiceError) as info:
        await collect(gw, user("hi", model="small"))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.reason == "UPSTREAM_REJECTED_REQUEST"
    assert backend.calls == {"small": 1}
    await gw.close()


async def test_clean_error_when_no_fallback_remains(engine: Engine, backend: FakeBackend) -> None:
    backend.behaviours["small"] = "garbage"
    backend.behaviours["backup"] = "error"
    gw = make_gateway(engine, load(portfolio_yaml(backend.base_url)))
    with pytest.raises(ServiceError) as info:
        await collect(gw, user("hi", model="small"))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.reason == "ALL_PROVIDERS_FAILED"
    assert info.value.metadata["tried"] == "small,backup"
    await gw.close()


async def test_hedging_takes_the_backup_when_the_primary_is_slow(engine: Engine, backend: FakeBackend) -> None:
    backend.behaviours["small"] = "hang_first"
    portfolio = load(portfolio_yaml(backend.base_url).replace("first_token_timeout_s: 0.5", "first_token_timeout_s: 20"))
    gw = make_gateway(engine, portfolio, hedge_after_s=0.05)
    _, text, fin = await collect(gw, user("hi", model="small"))
    assert text == EXPECTED_BACKUP
    assert fin.finish_reason == "stop"
    await gw.close()


@pytest.mark.parametrize("behaviour", ["garbage", "hang", "error"])
async def test_non_streaming_requests_fall_back_too(engine: Engine, backend: FakeBackend, behaviour: str) -> None:
    backend.behaviours["small"] = behaviour
    gw = make_gateway(engine, load(portfolio_yaml(backend.base_url)))
    _, text, fin = await collect(gw, user("hi", model="small", stream=False))
    assert text == EXPECTED_BACKUP and fin.model == "backup"
    assert "stream" not in backend.requests[-1]  # one non-streaming upstream call
    await gw.close()


async def test_experiment_arms_pick_model_and_prompt_version(engine: Engine, backend: FakeBackend) -> None:
    from llmo.router.experiments import FIXED_SPLIT, Arm
    from llmo.router.gateway import PromptSpec

    gw = make_gateway(engine, load(portfolio_yaml(backend.base_url)))
    gw.prompts.create_template("t1", "tone", "")
    gw.prompts.create_version("t1", "tone", "Be formal, {{name}}.", ["production"])
    gw.prompts.create_version("t1", "tone", "Be casual, {{name}}!", [])
    gw.experiments.create(
        "t1", "tone-test", FIXED_SPLIT,
        [Arm("formal", "small", "promptTemplates/tone/versions/1"), Arm("casual", "backup", "promptTemplates/tone/versions/2")], 0.0,
    )
    seen = {}
    for i in range(12):
        req = user("hi", tenant="t1", experiment="experiments/tone-test", user=f"u{i}", prompt=PromptSpec("promptTemplates/tone", variables={"name": "Ann"}))
        started, _, fin = await collect(gw, req)
        d = started.decision
        seen[d.arm] = (d.model.name, d.prompt_version, backend.requests[-1]["messages"][0]["content"])
        assert d.policy == "experiment" and fin.model == d.model.name
    assert seen["formal"] == ("small", "promptTemplates/tone/versions/1", "Be formal, Ann.")
    assert seen["casual"] == ("backup", "promptTemplates/tone/versions/2", "Be casual, Ann!")
    stats = {s.arm: s.requests for s in gw.experiments.get("t1", "tone-test").stats}
    assert sum(stats.values()) == 12 and all(v > 0 for v in stats.values())
    await gw.close()
