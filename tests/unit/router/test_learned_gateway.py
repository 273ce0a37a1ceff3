from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from llmo.core.errors import ServiceError
from llmo.router.integrations import LearnedScorer
from llmo.router.learned.data import load_routing_data
from llmo.router.learned.embed import Embedder
from llmo.router.learned.model import ComplexityRouter
from llmo.router.learned.train import train_router

from .conftest import EASY, HARD
from .gw_helpers import load, make_gateway, portfolio_yaml, user

ROUTING = "routing:\n  weak_model: small\n  strong_model: backup\n  strong_share: 0.5\n"


async def test_service_routes_with_a_trained_artifact(routing_dir: Path, embedder: Embedder, engine: Engine, tmp_path: Path) -> None:
    artifact = train_router(load_routing_data(routing_dir), embedder, version="v7").save(tmp_path / "router")
    scorer = LearnedScorer(ComplexityRouter.load(artifact), embedder, strong_share=0.5)
    gw = make_gateway(engine, load(portfolio_yaml("http://127.0.0.1:1/v1") + ROUTING), learned=scorer)
    hard = [(await gw.prepare(user(q))).decision for q in HARD[:5]]
    easy = [(await gw.prepare(user(q))).decision for q in EASY[:5]]
    assert all(d.policy == "learned" for d in hard + easy)
    assert sum(d.model.name == "backup" for d in hard) >= 4
    assert sum(d.model.name == "small" for d in easy) >= 4
    assert hard[0].reason.startswith("learned router v7: score")
    # A per-request strong share of 0 sends everything to the weak model, 1 to the strong one.
    assert (await gw.prepare(user(HARD[0], strong_share=0.0))).decision.model.name == "small"
    assert (await gw.prepare(user(EASY[0], strong_share=1.0))).decision.model.name == "backup"
    with pytest.raises(ServiceError) as err:
        await gw.prepare(user(EASY[0], strong_share=1.5))
    assert err.value.reason == "INVALID_STRONG_SHARE"


async def test_learned_policy_without_a_router_is_a_clear_error(engine: Engine) -> None:
    gw = make_gateway(engine, load(portfolio_yaml("http://127.0.0.1:1/v1") + ROUTING))
    with pytest.raises(ServiceError) as err:
        await gw.prepare(user("hi", policy="learned"))
    assert err.value.reason == "LEARNED_ROUTING_UNCONFIGURED"
    # Without a router and without an explicit policy the cheapest eligible model is used.
    assert (await gw.prepare(user("hi"))).decision.policy == "constraints"
