"""The router service over real sockets: gRPC, OpenAI-compatible HTTP (driven by the OpenAI
SDK), a real misbehaving upstream HTTP server, a real nats-server, SQLite and the real
cost service for budgets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats.errors
import openai
import pytest

from llmo.core.errors import error_info
from llmo.core.events import EventBus
from llmo.core.natsd import NatsServer
from llmo.protos.events.v1 import events_pb2
from llmo.protos.router.v1 import router_service_pb2 as pb
from llmo.protos.router.v1 import router_service_pb2_grpc as pb_grpc
from llmo.router.fake_backend import FakeBackend
from llmo.router.main import RunningRouter, start
from llmo.router.settings import RouterSettings

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}


def portfolio(base_url: str) -> str:
    return f"""
providers:
  primary:
    kind: openai
    base_url: {base_url}
    max_retries: 0
    first_token_timeout_s: 1
    idle_timeout_s: 1
  secondary:
    kind: openai
    base_url: {base_url}
    max_retries: 0
models:
  - name: small
    provider: primary
    input_price_micros_per_mtok: 100000
    output_price_micros_per_mtok: 200000
    context_window: 4096
    quality: 0.6
    latency: {{ttft_ms: 50}}
    fallbacks: [big]
  - name: big
    provider: secondary
    input_price_micros_per_mtok: 5000000
    output_price_micros_per_mtok: 15000000
    context_window: 8192
    capabilities: [json, tools]
    quality: 0.9
    latency: {{ttft_ms: 400}}
routing:
  default_model: small
"""


@dataclass
class Harness:
    router: RunningRouter
    backend: FakeBackend
    portfolio_file: Path
    nats: NatsServer
    channel: grpc.aio.Channel

    def stub(self) -> pb_grpc.RouterServiceStub:
        return pb_grpc.RouterServiceStub(self.channel)

    def sdk(self, key: str = "key-a") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{self.router.http_port}/v1", api_key=key, max_retries=0)


def settings_for(tmp_path: Path, nats: NatsServer, portfolio_file: Path, **extra: object) -> RouterSettings:
    return RouterSettings(
        database_url=f"sqlite:///{tmp_path / 'router.db'}",
        metrics_port=-1,
        portfolio_path=str(portfolio_file),
        portfolio_reload_s=0.1,
        platform={"nats_url": nats.url, "data_dir": tmp_path, "drain_seconds": 0.2, "api_keys": KEYS},
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture
async def svc(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[Harness]:
    backend = await FakeBackend(tokens=5, hang_s=30).start()
    pf = tmp_path / "portfolio.yaml"
    pf.write_text(portfolio(backend.base_url))
    router = await start(settings_for(tmp_path, nats_server, pf), port=0, http_port=0, metrics=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}")
    try:
        yield Harness(router, backend, pf, nats_server, channel)
    finally:
        await channel.close()
        await router.stop()
        await backend.stop()


def auth(key: str = "key-a") -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


async def complete(stub: pb_grpc.RouterServiceStub, req: pb.CompleteRequest, key: str = "key-a") -> list[pb.CompleteResponse]:
    return [r async for r in stub.Complete(req, metadata=auth(key))]


def user_msg(text: str) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role="user", content=text)]


async def test_grpc_complete_streams_and_publishes_events(svc: Harness) -> None:
    bus = await EventBus(svc.nats.url).connect()
    await bus.ensure_stream("router")
    sub = await bus.js.pull_subscribe("llmo.router.v1.>", durable="t", stream="LLMO_ROUTER")
    out = await complete(svc.stub(), pb.CompleteRequest(messages=user_msg("hello there"), routing=pb.RoutingOptions(model="small")))
    assert out[0].decision.model == "small" and out[0].decision.policy == "explicit"
    assert [c.model for c in out[0].decision.candidates] == ["small", "big"]
    assert "".join(r.delta for r in out) == "".join(f"small-w{i} " for i in range(5))
    last = out[-1]
    assert last.finish_reason == "stop" and last.usage.output_tokens == 5 and last.estimated_cost.micros > 0
    kinds = {}
    async with asyncio.timeout(30):  # the outbox may send the two events in separate batches
        while len(kinds) < 2:
            try:
                fetched = await sub.fetch(2, timeout=2)
            except nats.errors.TimeoutError:
                continue
            for m in fetched:
                kinds[m.subject] = m
                await m.ack()
    routed = events_pb2.RouterRouted.FromString(kinds["llmo.router.v1.routed"].data)
    done = events_pb2.RouterCompleted.FromString(kinds["llmo.router.v1.completed"].data)
    assert routed.model == "small" and routed.attribution.tenant == "tenant-a"
    assert done.request_id == last.request_id and done.usage.output_tokens == 5 and done.status == "ok"
    assert done.provider == "primary" and done.estimated_cost.micros == last.estimated_cost.micros
    assert not done.HasField("content")  # user text stays off the bus unless event_content_sample asks
    # The upstream saw the same request id, so its own usage event and ours name one call.
    assert svc.backend.request_ids[-1] == last.request_id
    await bus.close()


async def test_route_dry_run_explains_and_errors_carry_error_info(svc: Harness) -> None:
    stub = svc.stub()
    resp = await stub.Route(
        pb.RouteRequest(
            messages=user_msg("Return JSON please"),
            routing=pb.RoutingOptions(
                policy=pb.ROUTING_POLICY_CONSTRAINTS, constraints=pb.Constraints(required_capabilities=["json"])
            ),
        ),
        metadata=auth(),
    )
    d = resp.decision
    assert d.model == "big" and d.policy == "constraints"
    notes = {c.model: (c.eligible, c.note) for c in d.candidates}
    assert notes["small"] == (False, "lacks json")
    assert svc.backend.calls == {}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Route(pb.RouteRequest(messages=user_msg("x"), routing=pb.RoutingOptions(model="nope")), metadata=auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(err.value)
    assert info is not None and info.reason == "UNKNOWN_MODEL" and info.domain == "llmo.router"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Route(
            pb.RouteRequest(messages=user_msg("x"), routing=pb.RoutingOptions(constraints=pb.Constraints(min_quality=0.99), policy=pb.ROUTING_POLICY_CONSTRAINTS)),
            metadata=auth(),
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err.value).reason == "NO_ELIGIBLE_MODEL"  # type: ignore[union-attr]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Route(pb.RouteRequest(messages=user_msg("x")), metadata=auth("wrong"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_openai_sdk_streams_through_a_provider_that_breaks_mid_stream(svc: Harness) -> None:
    svc.backend.behaviours["small"] = "garbage"
    client = svc.sdk()
    stream = await client.chat.completions.create(
        model="small", messages=[{"role": "user", "content": "tell me"}], stream=True
    )
    parts = []
    finish = None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts) == "small-w0 small-w1 " + "".join(f"big-w{i} " for i in range(5))
    assert finish == "stop"
    # The breaker has not opened after one failure: "auto" (default model small) fails over again.
    plain = await client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "plain one"}])
    assert plain.choices[0].message.content == "".join(f"big-w{i} " for i in range(5))
    assert plain.model == "big" and plain.usage is not None and plain.usage.completion_tokens == 5
    models = await client.models.list()
    assert [m.id async for m in models] == ["auto", "small", "big"]
    await client.close()


async def test_openai_sdk_gets_a_clean_error_when_every_provider_fails(svc: Harness) -> None:
    svc.backend.behaviours.update(small="error", big="error")
    client = svc.sdk()
    with pytest.raises(openai.APIStatusError) as err:
        stream = await client.chat.completions.create(model="small", messages=[{"role": "user", "content": "q"}], stream=True)
        async for _ in stream:
            pass
    assert err.value.status_code == 503
    assert err.value.code == "ALL_PROVIDERS_FAILED"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="small", messages=[])
    assert bad.value.code == "EMPTY_MESSAGES"  # type: ignore[attr-defined]
    with pytest.raises(openai.AuthenticationError):
        await svc.sdk("wrong").chat.completions.create(model="small", messages=[{"role": "user", "content": "q"}])
    await client.close()


async def test_semantic_cache_hits_within_a_tenant_and_never_across(svc: Harness) -> None:
    a, b = svc.sdk("key-a"), svc.sdk("key-b")
    q = "What is the capital city of France?"
    first = await a.chat.completions.create(model="small", messages=[{"role": "user", "content": q}])
    assert svc.backend.calls["small"] == 1
    again = await a.chat.completions.create(model="small", messages=[{"role": "user", "content": q}])
    assert again.choices[0].message.content == first.choices[0].message.content
    assert svc.backend.calls["small"] == 1  # exact hit
    # The embedding for similarity hits is added just after the answer is returned.
    for _ in range(100):
        if any(e.vector is not None for e in svc.router.gateway.cache._tenants["tenant-a"].values()):  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.05)
    similar = await a.chat.completions.create(model="small", messages=[{"role": "user", "content": "what is the  capital city of france?"}])
    assert similar.choices[0].message.content == first.choices[0].message.content
    assert svc.backend.calls["small"] == 1  # semantic hit
    await a.chat.completions.create(model="small", messages=[{"role": "user", "content": "What is the capital city of Spain?"}])
    assert svc.backend.calls["small"] == 2  # a different question is not a hit
    other = await b.chat.completions.create(model="small", messages=[{"role": "user", "content": q}])
    assert svc.backend.calls["small"] == 3  # tenant B never sees tenant A's answer
    assert other.choices[0].message.content
    await a.close()
    await b.close()


async def test_prompt_registry_over_grpc(svc: Harness) -> None:
    stub = svc.stub()
    t = await stub.CreatePromptTemplate(pb.CreatePromptTemplateRequest(prompt_template_id="greet", description="hi"), metadata=auth())
    assert t.prompt_template.name == "promptTemplates/greet"
    v1 = await stub.CreatePromptVersion(pb.CreatePromptVersionRequest(parent="promptTemplates/greet", body="Hello {{name}}!", labels=["production"]), metadata=auth())
    v2 = await stub.CreatePromptVersion(
        pb.CreatePromptVersionRequest(parent="promptTemplates/greet", body="Dear {{name}}, you work at {{company}}. " * 5), metadata=auth()
    )
    assert (v1.prompt_version.version, v2.prompt_version.version) == (1, 2)
    assert list(v2.prompt_version.variables) == ["company", "name"]
    assert v2.prompt_version.token_count > v1.prompt_version.token_count > 0
    r = await stub.RenderPrompt(pb.RenderPromptRequest(name="promptTemplates/greet", variables={"name": "Ada"}), metadata=auth())
    assert r.text == "Hello Ada!" and r.prompt_version == "promptTemplates/greet/versions/1"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RenderPrompt(pb.RenderPromptRequest(name="promptTemplates/greet", version=2, variables={"name": "Ada"}), metadata=auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err.value).reason == "MISSING_VARIABLE"  # type: ignore[union-attr]
    await stub.SetPromptLabel(pb.SetPromptLabelRequest(name="promptTemplates/greet", label="canary", version=2), metadata=auth())
    page1 = await stub.ListPromptVersions(pb.ListPromptVersionsRequest(parent="promptTemplates/greet", page_size=1), metadata=auth())
    page2 = await stub.ListPromptVersions(
        pb.ListPromptVersionsRequest(parent="promptTemplates/greet", page_size=1, page_token=page1.next_page_token), metadata=auth()
    )
    assert [v.version for v in page1.prompt_versions] == [1] and [v.version for v in page2.prompt_versions] == [2]
    assert page2.prompt_versions[0].labels == ["canary"] and not page2.next_page_token
    audit = await stub.AuditPromptTokens(pb.AuditPromptTokensRequest(), metadata=auth())
    assert audit.entries[0].prompt_version.endswith("/versions/2") and audit.total_tokens > 0
    # Templates belong to their tenant.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetPromptTemplate(pb.GetPromptTemplateRequest(name="promptTemplates/greet"), metadata=auth("key-b"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # A completion can use the template; the rendered text becomes the system message.
    out = await complete(
        stub,
        pb.CompleteRequest(messages=user_msg("go"), prompt=pb.PromptRef(template="promptTemplates/greet", variables={"name": "Bo"}), routing=pb.RoutingOptions(model="small"), skip_cache=True),
    )
    assert out[0].decision.prompt_version == "promptTemplates/greet/versions/1"
    assert svc.backend.requests[-1]["messages"][0] == {"role": "system", "content": "Hello Bo!"}


async def test_experiment_sticky_split_feedback_and_stats(svc: Harness) -> None:
    stub = svc.stub()
    exp = pb.Experiment(
        allocation=pb.EXPERIMENT_ALLOCATION_FIXED_SPLIT,
        arms=[pb.ExperimentArm(arm="a", model="small", weight=1), pb.ExperimentArm(arm="b", model="big", weight=1)],
    )
    await stub.CreateExperiment(pb.CreateExperimentRequest(experiment_id="e1", experiment=exp), metadata=auth())
    arms_by_user: dict[str, set[str]] = {}
    request_ids = []
    for user in ["u1", "u2", "u3", "u4", "u5", "u6"]:
        for _ in range(2):
            out = await complete(stub, pb.CompleteRequest(messages=user_msg(f"q {user}"), experiment="experiments/e1", user=user, skip_cache=True))
            arms_by_user.setdefault(user, set()).add(out[0].decision.arm)
            request_ids.append(out[-1].request_id)
    assert all(len(a) == 1 for a in arms_by_user.values())  # sticky per user
    fb = await stub.RecordFeedback(pb.RecordFeedbackRequest(request_id=request_ids[0], score=0.9, event_id="f1"), metadata=auth())
    again = await stub.RecordFeedback(pb.RecordFeedbackRequest(request_id=request_ids[0], score=0.9, event_id="f1"), metadata=auth())
    assert fb.applied and not again.applied
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RecordFeedback(pb.RecordFeedbackRequest(request_id=request_ids[0], score=1.5), metadata=auth())
    assert error_info(err.value).reason == "INVALID_SCORE"  # type: ignore[union-attr]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RecordFeedback(pb.RecordFeedbackRequest(request_id=request_ids[0], score=0.5), metadata=auth("key-b"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    got = (await stub.GetExperiment(pb.GetExperimentRequest(name="experiments/e1"), metadata=auth())).experiment
    stats = {s.arm: s for s in got.stats}
    assert sum(s.requests for s in stats.values()) == 12
    assert sum(s.feedback_count for s in stats.values()) == 1
    await stub.StopExperiment(pb.StopExperimentRequest(name="experiments/e1"), metadata=auth())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete(stub, pb.CompleteRequest(messages=user_msg("x"), experiment="experiments/e1"))
    assert error_info(err.value).reason == "EXPERIMENT_STOPPED"  # type: ignore[union-attr]


async def test_portfolio_hot_reload_keeps_last_good_version(svc: Harness) -> None:
    stub = svc.stub()
    before = await stub.ListModels(pb.ListModelsRequest(), metadata=auth())
    assert [m.name for m in before.models] == ["models/small", "models/big"]
    svc.portfolio_file.write_text("models: [oops")
    await asyncio.sleep(0.4)
    still = await stub.ListModels(pb.ListModelsRequest(), metadata=auth())
    assert len(still.models) == 2
    assert svc.router.portfolio.last_error is not None and "not valid YAML" in svc.router.portfolio.last_error
    text = portfolio(svc.backend.base_url).replace("routing:", """  - name: tiny
    provider: primary
    input_price_micros_per_mtok: 1
    output_price_micros_per_mtok: 1
    context_window: 1024
routing:""")
    svc.portfolio_file.write_text(text)
    for _ in range(50):
        page = await stub.ListModels(pb.ListModelsRequest(page_size=2), metadata=auth())
        if page.next_page_token:
            break
        await asyncio.sleep(0.1)
    rest = await stub.ListModels(pb.ListModelsRequest(page_size=2, page_token=page.next_page_token), metadata=auth())
    assert [m.name for m in rest.models] == ["models/tiny"]


async def test_tenant_over_hard_budget_is_denied_before_any_model_call(tmp_path: Path, nats_server: NatsServer) -> None:
    from llmo.cost.main import start as start_cost
    from llmo.cost.settings import CostSettings
    from llmo.protos.common.v1 import common_pb2
    from llmo.protos.cost.v1 import cost_service_pb2 as cpb
    from llmo.protos.cost.v1 import cost_service_pb2_grpc as cpb_grpc

    cost = await start_cost(
        CostSettings(
            database_url=f"sqlite:///{tmp_path / 'cost.db'}",
            metrics_port=-1,
            consume_events=False,
            budget_refresh_s=0.1,
            platform={"nats_url": nats_server.url, "data_dir": tmp_path / "cost", "drain_seconds": 0.2},
        ),
        port=0,
        metrics=False,
    )
    cost_channel = grpc.aio.insecure_channel(f"127.0.0.1:{cost.port}")
    cost_stub = cpb_grpc.CostServiceStub(cost_channel)
    usd = lambda m: common_pb2.Money(currency_code="USD", micros=m)  # noqa: E731
    await cost_stub.CreateBudget(
        cpb.CreateBudgetRequest(budget_id="a-daily", budget=cpb.Budget(tenant="tenant-a", window=cpb.BUDGET_WINDOW_DAILY, hard_limit=usd(1000)))
    )
    await cost_stub.RecordUsage(
        cpb.RecordUsageRequest(
            records=[
                cpb.UsageRecord(
                    event_id="spent-1",
                    model="gpt-4o",
                    attribution=common_pb2.Attribution(tenant="tenant-a"),
                    usage=common_pb2.Usage(input_tokens=100_000, output_tokens=50_000),
                )
            ]
        )
    )
    backend = await FakeBackend(tokens=3).start()
    pf = tmp_path / "portfolio.yaml"
    pf.write_text(portfolio(backend.base_url))
    router = await start(
        settings_for(tmp_path, nats_server, pf, cost_target=f"127.0.0.1:{cost.port}", budget_timeout_s=5.0, events=False),
        port=0,
        http_port=0,
        metrics=False,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}")
    try:
        stub = pb_grpc.RouterServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await complete(stub, pb.CompleteRequest(messages=user_msg("hi"), routing=pb.RoutingOptions(model="small")))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(err.value)
        assert info is not None and info.reason == "BUDGET_EXCEEDED"
        assert info.metadata["budget"] == "budgets/a-daily" and info.metadata["limit_micros"] == "1000"
        assert info.metadata["budget_reason"] == "hard_limit_reached"
        assert backend.calls == {}  # no model was called
        # The HTTP front answers 429 with the same reason.
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{router.http_port}/v1", api_key="key-a", max_retries=0)
        with pytest.raises(openai.RateLimitError) as http_err:
            await client.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}])
        assert http_err.value.code == "BUDGET_EXCEEDED"  # type: ignore[attr-defined]
        await client.close()
        # Another tenant is within its budget and is served; its estimate is reserved.
        await cost_stub.CreateBudget(
            cpb.CreateBudgetRequest(budget_id="b-daily", budget=cpb.Budget(tenant="tenant-b", window=cpb.BUDGET_WINDOW_DAILY, hard_limit=usd(10_000_000)))
        )
        await asyncio.sleep(0.3)
        out = await complete(stub, pb.CompleteRequest(messages=user_msg("hi"), routing=pb.RoutingOptions(model="small")), key="key-b")
        assert out[-1].finish_reason == "stop"
        assert backend.calls == {"small": 1}
        reserved = (await cost_stub.GetBudget(cpb.GetBudgetRequest(name="budgets/b-daily"))).status.reserved.micros
        assert reserved > 0
        # A request that no provider could serve gives its reservation back.
        backend.behaviours.update(small="error", big="error")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await complete(stub, pb.CompleteRequest(messages=user_msg("again"), routing=pb.RoutingOptions(model="small")), key="key-b")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        after = (await cost_stub.GetBudget(cpb.GetBudgetRequest(name="budgets/b-daily"))).status.reserved.micros
        assert after == reserved
    finally:
        await channel.close()
        await router.stop()
        await backend.stop()
        await cost_channel.close()
        await cost.stop()


async def test_bandit_state_survives_a_restart(tmp_path: Path, nats_server: NatsServer) -> None:
    backend = await FakeBackend(tokens=3).start()
    pf = tmp_path / "portfolio.yaml"
    pf.write_text(portfolio(backend.base_url))
    settings = settings_for(tmp_path, nats_server, pf, events=False, cache_enabled=False)
    router = await start(settings, port=0, http_port=-1, metrics=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}")
    stub = pb_grpc.RouterServiceStub(channel)
    for _ in range(6):
        out = await complete(stub, pb.CompleteRequest(messages=user_msg("q"), routing=pb.RoutingOptions(policy=pb.ROUTING_POLICY_BANDIT)))
        assert out[0].decision.policy == "bandit" and "Thompson" in out[0].decision.reason
        good = 1.0 if out[-1].model == "small" else 0.0
        await stub.RecordFeedback(pb.RecordFeedbackRequest(request_id=out[-1].request_id, score=good), metadata=auth())
    before = router.gateway.bandit.states("tenant-a", "models", ["small", "big"])
    await channel.close()
    await router.stop()
    again = await start(settings, port=0, http_port=-1, metrics=False)
    try:
        after = again.gateway.bandit.states("tenant-a", "models", ["small", "big"])
        assert after == before
        assert sum(s.pulls for s in after.values()) == 6
        assert again.gateway.bandit.states("tenant-b", "models", ["small"])["small"].pulls == 0
    finally:
        await again.stop()
        await backend.stop()


async def test_first_start_writes_a_default_portfolio_for_the_inference_service(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await FakeBackend(tokens=3).start()
    monkeypatch.setenv("LLMO_INFERENCE_HTTP_URL", f"http://127.0.0.1:{backend.port}")
    pf = tmp_path / "fresh" / "portfolio.yaml"
    router = await start(settings_for(tmp_path, nats_server, pf, events=False), port=0, http_port=0, metrics=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}")
    try:
        assert pf.exists()
        stub = pb_grpc.RouterServiceStub(channel)
        out = await complete(stub, pb.CompleteRequest(messages=user_msg("hello")))
        assert out[0].decision.model == "llmo-demo" and out[-1].finish_reason == "stop"
        assert backend.calls == {"llmo-demo": 1}
    finally:
        await channel.close()
        await router.stop()
        await backend.stop()


async def test_evaluation_scores_from_nats_update_the_bandit(svc: Harness) -> None:
    stub = svc.stub()
    out = await complete(stub, pb.CompleteRequest(messages=user_msg("q"), routing=pb.RoutingOptions(policy=pb.ROUTING_POLICY_BANDIT), skip_cache=True))
    arm = out[-1].model
    bus = await EventBus(svc.nats.url).connect()
    event = events_pb2.EvaluationScored(event_id="score-1", request_id=out[-1].request_id, metric="relevancy", score=1.0)
    await bus.publish(event)
    await bus.publish(events_pb2.EvaluationScored(event_id="score-2", request_id="not-routed-here", score=0.5))
    bandit = svc.router.gateway.bandit
    for _ in range(100):
        if bandit.states("tenant-a", "models", [arm])[arm].pulls == 1:
            break
        await asyncio.sleep(0.05)
    state = bandit.states("tenant-a", "models", [arm])[arm]
    assert state.pulls == 1 and state.alpha > 1.0
    await bus.close()


async def test_completed_events_carry_content_when_sampled_and_only_reward_metrics_reach_the_bandit(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    backend = await FakeBackend(tokens=4).start()
    pf = tmp_path / "portfolio.yaml"
    pf.write_text(portfolio(backend.base_url))
    router = await start(settings_for(tmp_path, nats_server, pf, event_content_sample=1.0,
                                      reward_metrics="answer_relevancy"), port=0, http_port=0, metrics=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}")
    bus = await EventBus(nats_server.url).connect()
    try:
        await bus.ensure_stream("router")
        sub = await bus.js.pull_subscribe("llmo.router.v1.completed", durable="c", stream="LLMO_ROUTER")
        stub = pb_grpc.RouterServiceStub(channel)
        messages = [pb.ChatMessage(role="system", content="be brief"), pb.ChatMessage(role="user", content="first"),
                    pb.ChatMessage(role="assistant", content="ok"), pb.ChatMessage(role="user", content="what now?")]
        out = await complete(stub, pb.CompleteRequest(messages=messages, skip_cache=True,
                                                      routing=pb.RoutingOptions(policy=pb.ROUTING_POLICY_BANDIT)))
        async with asyncio.timeout(30):
            while True:
                try:
                    fetched = await sub.fetch(1, timeout=2)
                    break
                except nats.errors.TimeoutError:
                    continue
        done = events_pb2.RouterCompleted.FromString(fetched[0].data)
        assert done.content.input == "what now?"  # the last user message
        assert done.content.output == "".join(r.delta for r in out) and not done.content.truncated
        arm, request_id = out[-1].model, out[-1].request_id
        await bus.publish(events_pb2.EvaluationScored(event_id="s-1", request_id=request_id, metric="faithfulness",
                                                      score=0.0))
        await bus.publish(events_pb2.EvaluationScored(event_id="s-2", request_id=request_id,
                                                      metric="answer_relevancy", score=1.0))
        bandit = router.gateway.bandit
        for _ in range(200):
            if bandit.states("tenant-a", "models", [arm])[arm].pulls:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a faithfulness update would have landed by now too
        state = bandit.states("tenant-a", "models", [arm])[arm]
        assert state.pulls == 1 and state.alpha > 1.0  # the reward metric only: faithfulness was not a reward
    finally:
        await bus.close()
        await channel.close()
        await router.stop()
        await backend.stop()


async def test_budget_checks_use_the_routers_cost_key_and_a_refused_check_fails_closed(tmp_path: Path, nats_server: NatsServer) -> None:
    from llmo.cost.main import start as start_cost
    from llmo.cost.settings import CostSettings
    from llmo.protos.common.v1 import common_pb2
    from llmo.protos.cost.v1 import cost_service_pb2 as cpb
    from llmo.protos.cost.v1 import cost_service_pb2_grpc as cpb_grpc

    cost_keys = {"router-key": "llmo-router", "other-key": "tenant-b"}
    cost = await start_cost(
        CostSettings(
            database_url=f"sqlite:///{tmp_path / 'cost.db'}",
            metrics_port=-1,
            consume_events=False,
            budget_refresh_s=0.1,
            platform={"data_dir": tmp_path / "cost", "drain_seconds": 0.2, "api_keys": cost_keys, "admin_tenants": "llmo-router"},
        ),
        port=0,
        metrics=False,
    )
    cost_channel = grpc.aio.insecure_channel(f"127.0.0.1:{cost.port}")
    budget = cpb.Budget(tenant="tenant-a", window=cpb.BUDGET_WINDOW_DAILY, hard_limit=common_pb2.Money(currency_code="USD", micros=1))
    await cpb_grpc.CostServiceStub(cost_channel).CreateBudget(
        cpb.CreateBudgetRequest(budget_id="a-tiny", budget=budget), metadata=[("authorization", "Bearer router-key")]
    )
    backend = await FakeBackend(tokens=3).start()
    pf = tmp_path / "portfolio.yaml"
    pf.write_text(portfolio(backend.base_url))
    request = pb.CompleteRequest(messages=user_msg("hi"), routing=pb.RoutingOptions(model="small"))
    try:
        for cost_key, code, reason in (
            ("router-key", grpc.StatusCode.OK, ""),  # an admin identity: the end tenant's budget is checked
            ("", grpc.StatusCode.FAILED_PRECONDITION, "BUDGET_CHECK_REFUSED"),  # no key: UNAUTHENTICATED there
            ("other-key", grpc.StatusCode.FAILED_PRECONDITION, "BUDGET_CHECK_REFUSED"),  # another, non-admin tenant
        ):
            settings = settings_for(tmp_path, nats_server, pf, cost_target=f"127.0.0.1:{cost.port}", cost_api_key=cost_key, events=False)
            router = await start(settings, port=0, http_port=-1, metrics=False)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}")
            try:
                out = await complete(pb_grpc.RouterServiceStub(channel), request)
                assert code == grpc.StatusCode.OK and out[-1].finish_reason == "stop"
            except grpc.aio.AioRpcError as err:
                assert err.code() == code, err.details()
                info = error_info(err)
                assert info is not None and info.reason == reason
            finally:
                await channel.close()
                await router.stop()
        # the budget check itself worked with the router's key: the first request reserved against it
        assert backend.calls == {"small": 1}
    finally:
        await backend.stop()
        await cost_channel.close()
        await cost.stop()


async def test_soft_budget_downgrades_to_the_budgets_model(tmp_path: Path, nats_server: NatsServer) -> None:
    from llmo.cost.main import start as start_cost
    from llmo.cost.settings import CostSettings
    from llmo.protos.common.v1 import common_pb2
    from llmo.protos.cost.v1 import cost_service_pb2 as cpb
    from llmo.protos.cost.v1 import cost_service_pb2_grpc as cpb_grpc

    cost = await start_cost(
        CostSettings(
            database_url=f"sqlite:///{tmp_path / 'cost.db'}",
            metrics_port=-1,
            consume_events=False,
            budget_refresh_s=0.1,
            platform={"nats_url": nats_server.url, "data_dir": tmp_path / "cost", "drain_seconds": 0.2},
        ),
        port=0,
        metrics=False,
    )
    cost_channel = grpc.aio.insecure_channel(f"127.0.0.1:{cost.port}")
    budget = cpb.Budget(
        tenant="tenant-a",
        window=cpb.BUDGET_WINDOW_DAILY,
        soft_limit=common_pb2.Money(currency_code="USD", micros=1),
        hard_limit=common_pb2.Money(currency_code="USD", micros=10_000_000),
        downgrade_model="small",
    )
    await cpb_grpc.CostServiceStub(cost_channel).CreateBudget(cpb.CreateBudgetRequest(budget_id="a-soft", budget=budget))
    backend = await FakeBackend(tokens=3).start()
    pf = tmp_path / "portfolio.yaml"
    pf.write_text(portfolio(backend.base_url))
    router = await start(
        settings_for(tmp_path, nats_server, pf, cost_target=f"127.0.0.1:{cost.port}", budget_timeout_s=5.0, events=False),
        port=0,
        http_port=-1,
        metrics=False,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}")
    try:
        out = await complete(pb_grpc.RouterServiceStub(channel), pb.CompleteRequest(messages=user_msg("hi"), routing=pb.RoutingOptions(model="big")))
        d = out[0].decision
        assert d.policy == "budget_downgrade" and d.model == "small"
        assert "budgets/a-soft" in d.reason and "big -> small" in d.reason
        assert out[-1].model == "small" and backend.calls == {"small": 1}
    finally:
        await channel.close()
        await router.stop()
        await backend.stop()
        await cost_channel.close()
        await cost.stop()


async def test_http_stream_ends_with_an_error_event_when_no_fallback_can_finish(svc: Harness) -> None:
    svc.backend.behaviours.update(small="garbage", big="error")
    client = svc.sdk()
    parts: list[str] = []
    with pytest.raises(openai.APIError) as err:
        stream = await client.chat.completions.create(model="small", messages=[{"role": "user", "content": "q"}], stream=True)
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
    assert "".join(parts) == "small-w0 small-w1 "
    assert "every model in the fallback chain failed" in str(err.value)
    await client.close()
