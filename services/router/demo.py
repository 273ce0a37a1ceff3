"""`make demo` step: real requests through the router's gateway to the inference service's
OpenAI-compatible HTTP endpoint (or, without one, to a local fake backend)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import aiohttp

from llmo.router.bandit import BanditStore
from llmo.router.cache import SemanticCache
from llmo.router.context import Message
from llmo.router.experiments import ExperimentStore
from llmo.router.fake_backend import FakeBackend
from llmo.router.gateway import Delta, Finished, Gateway, GatewayRequest, PromptSpec, Started
from llmo.router.policies import Constraints
from llmo.router.portfolio import parse_portfolio
from llmo.router.prompts import PromptRegistry
from llmo.router.store import open_store


async def _upstream_models(base_url: str) -> list[str]:
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/models", timeout=aiohttp.ClientTimeout(total=5)) as resp:
        resp.raise_for_status()
        data = await resp.json()
    return [str(m["id"]) for m in data.get("data", [])]


def _portfolio(base_url: str, model: str) -> str:
    return f"""
providers:
  local:
    kind: openai
    base_url: {base_url}
    first_token_timeout_s: 60
    idle_timeout_s: 30
    timeout_s: 120
models:
  - name: local-small
    provider: local
    provider_model: {model}
    input_price_micros_per_mtok: 50000
    output_price_micros_per_mtok: 100000
    context_window: 2048
    max_output_tokens: 32
    quality: 0.4
    latency: {{ttft_ms: 100}}
  - name: local-careful
    provider: local
    provider_model: {model}
    input_price_micros_per_mtok: 400000
    output_price_micros_per_mtok: 800000
    context_window: 2048
    max_output_tokens: 48
    capabilities: [json]
    quality: 0.7
    latency: {{ttft_ms: 300}}
"""


async def run_demo(endpoints: dict[str, str]) -> list[str]:
    lines: list[str] = []
    fake: FakeBackend | None = None
    base = endpoints.get("inference_http", "").rstrip("/")
    if base:
        base = base if base.endswith("/v1") else base + "/v1"
        models = await _upstream_models(base)
        model = models[0] if models else "default"
        lines.append(f"router: upstream is the inference service at {base} (model {model})")
    else:
        fake = await FakeBackend(tokens=6).start()
        base, model = fake.base_url, "fake"
        lines.append("router: no inference_http endpoint; using a local fake OpenAI-compatible backend")
    with tempfile.TemporaryDirectory() as tmp:
        engine = await asyncio.to_thread(open_store, f"sqlite:///{Path(tmp) / 'router.db'}")
        portfolio = parse_portfolio(_portfolio(base, model))
        bandit = BanditStore(engine)
        gw = Gateway(
            lambda: portfolio,
            bandit=bandit,
            prompts=PromptRegistry(engine),
            experiments=ExperimentStore(engine, bandit),
            cache=SemanticCache(None),
        )
        try:
            prompts = gw.prompts
            await asyncio.to_thread(prompts.create_template, "demo", "poet", "house style")
            version = await asyncio.to_thread(prompts.create_version, "demo", "poet", "You write in the style of {{author}}.", ["production"])
            lines.append(f"router: prompt {version.name} ({version.token_count} tokens, labels {version.labels})")
            poem = GatewayRequest(tenant="demo", messages=[Message("user", "Say something about the sea.")], prompt=_poet(), max_tokens=24)
            json_req = GatewayRequest(
                tenant="demo",
                messages=[Message("user", "Answer in JSON: what is the sea?")],
                policy="constraints",
                constraints=Constraints(required_capabilities=frozenset({"json"})),
                max_tokens=24,
            )
            for req in (poem, json_req):
                lines.extend(await _run(gw, req))
            again = GatewayRequest(tenant="demo", messages=[Message("user", "Say something about the sea.")], prompt=_poet(), max_tokens=24)
            lines.extend(await _run(gw, again))
        finally:
            await gw.close()
            await asyncio.to_thread(engine.dispose)
            if fake is not None:
                await fake.stop()
    return lines


def _poet() -> PromptSpec:
    return PromptSpec("promptTemplates/poet", variables={"author": "Shakespeare"})


async def _run(gw: Gateway, req: GatewayRequest) -> list[str]:
    out: list[str] = []
    text: list[str] = []
    async for ev in gw.complete(req):
        if isinstance(ev, Started):
            out.append(f"router: routed to {ev.decision.model.name} [{ev.decision.policy}] because {ev.decision.reason}")
        elif isinstance(ev, Delta):
            text.append(ev.text)
        elif isinstance(ev, Finished):
            answer = "".join(text).strip().replace("\n", " ")
            out.append(
                f"router: {ev.model} answered {answer[:80]!r} ({ev.usage.completion_tokens} tokens, "
                f"{ev.cost_micros} micro-USD, cache_hit={ev.cache_hit})"
            )
    return out
