from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy.engine import Engine

from llmo.router.bandit import BanditStore
from llmo.router.cache import SemanticCache
from llmo.router.context import Message
from llmo.router.experiments import ExperimentStore
from llmo.router.gateway import Delta, Finished, Gateway, GatewayRequest, Started
from llmo.router.portfolio import Portfolio, parse_portfolio
from llmo.router.prompts import PromptRegistry


def portfolio_yaml(base_url: str, chain: str = "[backup]", primary_retries: int = 0, extra: str = "") -> str:
    return f"""
providers:
  primary:
    kind: openai
    base_url: {base_url}
    max_retries: {primary_retries}
    first_token_timeout_s: 0.5
    idle_timeout_s: 0.5
    breaker_failures: 2
    breaker_reset_s: 600
  secondary:
    kind: openai
    base_url: {base_url}
    max_retries: 0
    first_token_timeout_s: 2
    idle_timeout_s: 2
models:
  - name: small
    provider: primary
    input_price_micros_per_mtok: 100000
    output_price_micros_per_mtok: 200000
    context_window: 4096
    quality: 0.6
    latency: {{ttft_ms: 50}}
    fallbacks: {chain}
  - name: backup
    provider: secondary
    input_price_micros_per_mtok: 1000000
    output_price_micros_per_mtok: 3000000
    context_window: 8192
    capabilities: [json, tools]
    quality: 0.9
    latency: {{ttft_ms: 400}}
{extra}
"""


def make_gateway(engine: Engine, portfolio: Portfolio, **kwargs: object) -> Gateway:
    bandit = BanditStore(engine)
    return Gateway(
        lambda: portfolio,
        bandit=bandit,
        prompts=PromptRegistry(engine),
        experiments=ExperimentStore(engine, bandit),
        retry_base_s=0.001,
        **kwargs,  # type: ignore[arg-type]
    )


def load(text: str) -> Portfolio:
    return parse_portfolio(text)


async def collect(gw: Gateway, req: GatewayRequest) -> tuple[Started, str, Finished]:
    started: Started | None = None
    finished: Finished | None = None
    text = []
    async for ev in gw.complete(req):
        if isinstance(ev, Started):
            started = ev
        elif isinstance(ev, Delta):
            text.append(ev.text)
        elif isinstance(ev, Finished):
            finished = ev
    assert started is not None and finished is not None
    return started, "".join(text), finished


def user(text: str, tenant: str = "t1", **kw: object) -> GatewayRequest:
    return GatewayRequest(tenant=tenant, messages=[Message("user", text)], **kw)  # type: ignore[arg-type]


CacheFactory = Callable[[], SemanticCache]
__all__ = ["Path", "collect", "load", "make_gateway", "portfolio_yaml", "user"]
