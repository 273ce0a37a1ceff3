from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from sqlalchemy.engine import Engine

from llmo.core.errors import ServiceError
from llmo.router import policies
from llmo.router.bandit import BanditStore, cost_penalised_reward
from llmo.router.portfolio import PortfolioError, PortfolioStore, parse_portfolio
from llmo.router.resilience import BreakerState, CircuitBreaker, backoff_delay

from .gw_helpers import portfolio_yaml

GOOD = portfolio_yaml("http://127.0.0.1:1/v1")


def test_valid_portfolio_parses_prices_and_chains() -> None:
    p = parse_portfolio(GOOD)
    small = p.model("small")
    assert small is not None and small.cost_micros(1_000_000, 0) == 100_000
    assert small.cost_micros(1, 1) == 1  # rounded up, never free
    assert [m.name for m in p.fallback_chain("small")] == ["small", "backup"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.replace("provider: secondary", "provider: nowhere"), "unknown provider 'nowhere'"),
        (lambda t: t.replace("fallbacks: [backup]", "fallbacks: [ghost]"), "unknown fallback model 'ghost'"),
        (lambda t: t.replace("input_price_micros_per_mtok: 100000", "input_price_micros_per_mtok: -5"), "greater than or equal to 0"),
        (lambda t: t.replace("input_price_micros_per_mtok: 100000", "input_price_micros_per_mtok: 0.5"), "input_price_micros_per_mtok"),
        (lambda t: t.replace("kind: openai\n    base_url: http://127.0.0.1:1/v1\n    max_retries: 0", "kind: openai\n    max_retries: 0"), "needs base_url"),
        (lambda t: t + "\nsurprise: 1\n", "surprise: Extra inputs are not permitted"),
        (lambda t: "models: [", "not valid YAML"),
        (lambda t: "- just a list", "expected a mapping"),
    ],
)
def test_invalid_portfolios_fail_with_a_clear_message(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PortfolioError, match=message):
        parse_portfolio(mutate(GOOD))


def test_store_reloads_on_change_and_keeps_last_good(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(GOOD)
    seen: list[object] = []
    store = PortfolioStore(f, on_change=seen.append)
    assert not store.reload_if_changed()
    f.write_text(GOOD.replace("quality: 0.6", "quality: 0.7"))
    assert store.reload_if_changed()
    assert store.current.model("small").quality == 0.7  # type: ignore[union-attr]
    f.write_text("models: [")
    assert not store.reload_if_changed()
    assert store.current.model("small").quality == 0.7  # type: ignore[union-attr]
    assert store.last_error and "not valid YAML" in store.last_error
    assert len(seen) == 1


def _inp(**kw: object) -> policies.RoutingInput:
    base: dict[str, object] = {"tenant": "t", "prompt_text": "hi", "input_tokens": 100, "max_tokens": 100}
    base.update(kw)
    return policies.RoutingInput(**base)  # type: ignore[arg-type]


def test_constraints_pick_the_cheapest_eligible_and_explain() -> None:
    p = parse_portfolio(GOOD)
    d = policies.cheapest(p, _inp())
    assert d.model.name == "small" and d.policy == "constraints"
    d = policies.cheapest(p, _inp(constraints=policies.Constraints(required_capabilities=frozenset({"tools"}))))
    assert d.model.name == "backup"
    notes = {c.model: c.note for c in d.candidates}
    assert notes["small"] == "lacks tools"
    d = policies.cheapest(p, _inp(constraints=policies.Constraints(max_ttft_ms=100)))
    assert d.model.name == "small"
    with pytest.raises(ServiceError) as err:
        policies.cheapest(p, _inp(constraints=policies.Constraints(max_cost_micros=1)))
    assert err.value.reason == "NO_ELIGIBLE_MODEL" and "cost" in err.value.message
    with pytest.raises(ServiceError) as err:
        policies.cheapest(p, _inp(input_tokens=100_000))
    assert err.value.reason == "CONTEXT_TOO_LONG"
    with pytest.raises(ServiceError) as err:
        policies.cheapest(p, _inp(constraints=policies.Constraints(required_capabilities=frozenset({"telepathy"}))))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.reason == "UNKNOWN_CAPABILITY"


def test_explicit_and_learned_policies() -> None:
    text = GOOD + "routing:\n  weak_model: small\n  strong_model: backup\n"
    p = parse_portfolio(text)
    with pytest.raises(ServiceError) as err:
        policies.explicit(p, _inp(), "nope")
    assert err.value.reason == "UNKNOWN_MODEL"
    hard = policies.learned(p, _inp(), score=0.9, threshold=0.5, version="v1")
    easy = policies.learned(p, _inp(), score=0.1, threshold=0.5, version="v1")
    assert hard.model.name == "backup" and "strong model" in hard.reason and "0.900" in hard.reason
    assert easy.model.name == "small" and "weak model" in easy.reason
    # The strong model is ineligible (cost): the learned policy says so and uses the weak one.
    capped = policies.learned(p, _inp(constraints=policies.Constraints(max_cost_micros=200)), 0.9, 0.5, "v1")
    assert capped.model.name == "small" and "ineligible" in capped.reason


def test_bandit_learns_the_better_arm_per_tenant(engine: Engine) -> None:
    import random

    store = BanditStore(engine, rng=random.Random(7))
    for _ in range(40):
        store.update("t1", "models", "small", 0.9)
        store.update("t1", "models", "backup", 0.2)
    picks = [store.choose("t1", "models", ["small", "backup"]).arm for _ in range(50)]
    assert picks.count("small") > 45
    fresh = store.states("t2", "models", ["small"])["small"]
    assert (fresh.alpha, fresh.beta, fresh.pulls) == (1.0, 1.0, 0)
    assert store.update("t1", "models", "small", 1.0, event_id="e1")
    assert not store.update("t1", "models", "small", 1.0, event_id="e1")  # redelivered event applied once
    with pytest.raises(ValueError):
        store.update("t1", "models", "small", 1.5)


def test_cost_penalised_reward() -> None:
    assert cost_penalised_reward(0.9, 0, 1.0, 10_000) == pytest.approx(0.9)
    assert cost_penalised_reward(0.9, 5_000, 1.0, 10_000) == pytest.approx(0.4)
    assert cost_penalised_reward(0.2, 50_000, 1.0, 10_000) == 0.0


def test_circuit_breaker_opens_half_opens_and_closes() -> None:
    now = [0.0]
    b = CircuitBreaker(failure_threshold=2, reset_s=10, clock=lambda: now[0])
    b.record_failure()
    assert b.allow()
    b.record_failure()
    assert b.state == BreakerState.OPEN and not b.allow()
    now[0] = 11
    assert b.state == BreakerState.HALF_OPEN
    assert b.allow() and not b.allow()  # one trial at a time
    b.record_failure()
    assert b.state == BreakerState.OPEN
    now[0] = 22
    assert b.allow()
    b.record_success()
    assert b.state == BreakerState.CLOSED


def test_backoff_is_jittered_and_capped() -> None:
    import random

    rng = random.Random(1)
    delays = [backoff_delay(a, 0.1, 1.0, rng) for a in range(10)]
    assert all(0 <= d <= 1.0 for d in delays)
    assert len(set(delays)) == len(delays)
