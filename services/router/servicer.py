"""gRPC `llmo.router.v1.RouterService`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from llmo.core import context as ctx
from llmo.core.errors import invalid_argument
from llmo.core.pagination import decode_page_token, encode_page_token, page_size
from llmo.protos.common.v1 import common_pb2
from llmo.protos.router.v1 import router_service_pb2 as pb
from llmo.protos.router.v1 import router_service_pb2_grpc
from llmo.router import policies
from llmo.router.context import Message
from llmo.router.experiments import BANDIT, FIXED_SPLIT, Arm, ExperimentInfo, parse_experiment_name
from llmo.router.feedback import FeedbackRecorder
from llmo.router.gateway import Delta, Finished, Gateway, GatewayRequest, PromptSpec, Started
from llmo.router.prompts import TemplateInfo, VersionInfo, parse_template_name, parse_version_name
from llmo.router.sampling import Sampling

_POLICIES = {
    pb.ROUTING_POLICY_UNSPECIFIED: "",
    pb.ROUTING_POLICY_EXPLICIT: policies.EXPLICIT,
    pb.ROUTING_POLICY_CONSTRAINTS: policies.CONSTRAINTS,
    pb.ROUTING_POLICY_LEARNED: policies.LEARNED,
    pb.ROUTING_POLICY_BANDIT: policies.BANDIT,
}
_ALLOCATIONS = {pb.EXPERIMENT_ALLOCATION_FIXED_SPLIT: FIXED_SPLIT, pb.EXPERIMENT_ALLOCATION_BANDIT: BANDIT}


def _tenant() -> str:
    return ctx.current_tenant() or "default"


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _money(micros: int) -> common_pb2.Money:
    return common_pb2.Money(currency_code="USD", micros=micros)


def gateway_request(r: Any, tenant: str, skip_cache: bool = False) -> GatewayRequest:
    routing = r.routing
    c = routing.constraints
    prompt = None
    if r.HasField("prompt") and r.prompt.template:
        prompt = PromptSpec(r.prompt.template, r.prompt.version, r.prompt.label, dict(r.prompt.variables))
    return GatewayRequest(
        tenant=tenant,
        messages=[Message(m.role, m.content) for m in r.messages],
        prompt=prompt,
        policy=_POLICIES.get(routing.policy, ""),
        model=routing.model,
        constraints=policies.Constraints(
            max_cost_micros=c.max_cost.micros,
            max_ttft_ms=c.max_ttft_ms,
            required_capabilities=frozenset(c.required_capabilities),
            min_quality=c.min_quality,
        ),
        strong_share=routing.strong_share if routing.HasField("strong_share") else None,
        max_prompt_tokens=r.context.max_prompt_tokens,
        compress_message_tokens=r.context.compress_message_tokens,
        token_keep_ratio=r.context.token_keep_ratio,
        max_tokens=r.max_tokens,
        sampling=Sampling(temperature=r.temperature if "temperature" in r.DESCRIPTOR.fields_by_name and r.HasField("temperature") else None),
        experiment=r.experiment,
        user=r.user,
        application=r.application,
        skip_cache=skip_cache,
        request_id=ctx.current_request_id() or "",
    )


def decision_pb(started: Started) -> pb.RouteDecision:
    d = started.decision
    return pb.RouteDecision(
        policy=d.policy,
        model=d.model.name,
        provider=d.model.provider,
        reason=d.reason,
        candidates=[
            pb.Candidate(
                model=c.model,
                provider=c.provider,
                predicted_quality=c.predicted_quality,
                estimated_cost=_money(c.cost_micros),
                predicted_ttft_ms=c.predicted_ttft_ms,
                eligible=c.eligible,
                note=c.note,
            )
            for c in d.candidates
        ],
        fallbacks=d.fallbacks,
        experiment=d.experiment,
        arm=d.arm,
        prompt_version=d.prompt_version,
        input_tokens=started.input_tokens,
        tokens_saved=started.tokens_saved,
    )


def template_pb(t: TemplateInfo) -> pb.PromptTemplate:
    return pb.PromptTemplate(
        name=t.name, description=t.description, create_time=_ts(t.created_at), labels=t.labels, latest_version=t.latest_version
    )


def version_pb(v: VersionInfo) -> pb.PromptVersion:
    return pb.PromptVersion(
        name=v.name,
        version=v.version,
        body=v.body,
        variables=v.variables,
        token_count=v.token_count,
        create_time=_ts(v.created_at),
        labels=v.labels,
    )


def experiment_pb(e: ExperimentInfo) -> pb.Experiment:
    alloc = {v: k for k, v in _ALLOCATIONS.items()}[e.allocation]
    return pb.Experiment(
        name=e.name,
        allocation=alloc,  # type: ignore[arg-type]
        arms=[pb.ExperimentArm(arm=a.arm, model=a.model, prompt_version=a.prompt_version, weight=a.weight) for a in e.arms],
        cost_weight=e.cost_weight,
        state=pb.EXPERIMENT_STATE_RUNNING if e.active else pb.EXPERIMENT_STATE_STOPPED,
        create_time=_ts(e.created_at),
        stats=[
            pb.ArmStats(
                arm=s.arm,
                requests=s.requests,
                feedback_count=s.feedback_count,
                mean_quality=s.mean_quality,
                total_cost=_money(s.cost_micros),
                mean_latency_ms=s.mean_latency_ms,
            )
            for s in e.stats
        ],
    )


class RouterServicer(router_service_pb2_grpc.RouterServiceServicer):
    def __init__(self, gateway: Gateway, feedback: FeedbackRecorder) -> None:
        self.gw = gateway
        self.feedback = feedback

    async def Complete(self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.CompleteResponse]:  # type: ignore[override]
        req = gateway_request(request, _tenant(), request.skip_cache)
        request_id = ""
        async for ev in self.gw.complete(req):
            if isinstance(ev, Started):
                request_id = ev.request_id
                yield pb.CompleteResponse(request_id=request_id, decision=decision_pb(ev), model=ev.decision.model.name)
            elif isinstance(ev, Delta):
                yield pb.CompleteResponse(request_id=request_id, delta=ev.text)
            elif isinstance(ev, Finished):
                yield pb.CompleteResponse(
                    request_id=request_id,
                    finish_reason=ev.finish_reason,
                    model=ev.model,
                    usage=common_pb2.Usage(input_tokens=ev.usage.uncached_prompt_tokens,
                                           cached_input_tokens=ev.usage.cached_tokens,
                                           output_tokens=ev.usage.completion_tokens),
                    estimated_cost=_money(ev.cost_micros),
                    cache_hit=ev.cache_hit,
                    fallbacks=ev.fallbacks,
                )

    async def Route(self, request: pb.RouteRequest, context: grpc.aio.ServicerContext) -> pb.RouteResponse:
        prepared = await self.gw.prepare(gateway_request(request, _tenant()))
        started = Started(prepared.request_id, prepared.decision, prepared.input_tokens, prepared.tokens_saved)
        return pb.RouteResponse(decision=decision_pb(started))

    async def RecordFeedback(
        self, request: pb.RecordFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordFeedbackResponse:
        res = await asyncio.to_thread(self.feedback.record, _tenant(), request.request_id, request.score, request.event_id)
        return pb.RecordFeedbackResponse(
            applied=res.applied, model=res.model, experiment=res.experiment, arm=res.arm, reward=res.reward
        )

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        size = page_size(request.page_size)
        pos = decode_page_token(request.page_token) or {"i": 0}
        start = int(pos.get("i", 0))
        portfolio = self.gw.portfolio
        states = self.gw.breakers.states()
        models = list(portfolio.models)[start : start + size]
        out = [
            pb.ModelInfo(
                name=f"models/{m.name}",
                provider=m.provider,
                input_price_per_mtok=_money(m.input_price_micros_per_mtok),
                output_price_per_mtok=_money(m.output_price_micros_per_mtok),
                context_window=m.context_window,
                capabilities=sorted(c.value for c in m.capabilities),
                predicted_ttft_ms=m.latency.ttft_ms,
                quality_prior=m.quality,
                fallbacks=list(m.fallbacks),
                breaker_state=str(states.get(m.provider, "closed")),
            )
            for m in models
        ]
        nxt = encode_page_token({"i": start + size}) if start + size < len(portfolio.models) else ""
        return pb.ListModelsResponse(models=out, next_page_token=nxt)

    # ---------------------------------------------------------------- prompt registry

    async def CreatePromptTemplate(
        self, request: pb.CreatePromptTemplateRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreatePromptTemplateResponse:
        t = await asyncio.to_thread(self.gw.prompts.create_template, _tenant(), request.prompt_template_id, request.description)
        return pb.CreatePromptTemplateResponse(prompt_template=template_pb(t))

    async def GetPromptTemplate(
        self, request: pb.GetPromptTemplateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPromptTemplateResponse:
        t = await asyncio.to_thread(self.gw.prompts.get_template, _tenant(), parse_template_name(request.name))
        return pb.GetPromptTemplateResponse(prompt_template=template_pb(t))

    async def ListPromptTemplates(
        self, request: pb.ListPromptTemplatesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPromptTemplatesResponse:
        size = page_size(request.page_size)
        after = str((decode_page_token(request.page_token) or {}).get("after", ""))
        items = await asyncio.to_thread(self.gw.prompts.list_templates, _tenant(), after, size + 1)
        nxt = encode_page_token({"after": items[size - 1].template_id}) if len(items) > size else ""
        return pb.ListPromptTemplatesResponse(prompt_templates=[template_pb(t) for t in items[:size]], next_page_token=nxt)

    async def CreatePromptVersion(
        self, request: pb.CreatePromptVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreatePromptVersionResponse:
        tid = parse_template_name(request.parent)
        v = await asyncio.to_thread(self.gw.prompts.create_version, _tenant(), tid, request.body, list(request.labels))
        return pb.CreatePromptVersionResponse(prompt_version=version_pb(v))

    async def ListPromptVersions(
        self, request: pb.ListPromptVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPromptVersionsResponse:
        tid = parse_template_name(request.parent)
        size = page_size(request.page_size)
        after = int((decode_page_token(request.page_token, query=tid) or {}).get("after", 0))
        items = await asyncio.to_thread(self.gw.prompts.list_versions, _tenant(), tid, after, size + 1)
        nxt = encode_page_token({"after": items[size - 1].version}, query=tid) if len(items) > size else ""
        return pb.ListPromptVersionsResponse(prompt_versions=[version_pb(v) for v in items[:size]], next_page_token=nxt)

    async def SetPromptLabel(self, request: pb.SetPromptLabelRequest, context: grpc.aio.ServicerContext) -> pb.SetPromptLabelResponse:
        tid = parse_template_name(request.name)
        t = await asyncio.to_thread(self.gw.prompts.set_label, _tenant(), tid, request.label, request.version)
        return pb.SetPromptLabelResponse(prompt_template=template_pb(t))

    async def RenderPrompt(self, request: pb.RenderPromptRequest, context: grpc.aio.ServicerContext) -> pb.RenderPromptResponse:
        from llmo.router.tokens import count_tokens

        tid = parse_template_name(request.name)
        text, info = await asyncio.to_thread(
            self.gw.prompts.render, _tenant(), tid, dict(request.variables), request.version, request.label
        )
        return pb.RenderPromptResponse(text=text, token_count=count_tokens(text), prompt_version=info.name)

    async def AuditPromptTokens(
        self, request: pb.AuditPromptTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuditPromptTokensResponse:
        size = page_size(request.page_size)
        offset = int((decode_page_token(request.page_token) or {}).get("offset", 0))
        rows, total = await asyncio.to_thread(self.gw.prompts.audit, _tenant(), offset, size + 1)
        nxt = encode_page_token({"offset": offset + size}) if len(rows) > size else ""
        return pb.AuditPromptTokensResponse(
            entries=[
                pb.PromptTokenAudit(prompt_version=v.name, token_count=v.token_count, labels=v.labels, share=share)
                for v, share in rows[:size]
            ],
            next_page_token=nxt,
            total_tokens=total,
        )

    # ---------------------------------------------------------------- experiments

    async def CreateExperiment(
        self, request: pb.CreateExperimentRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateExperimentResponse:
        e = request.experiment
        allocation = _ALLOCATIONS.get(e.allocation)
        if allocation is None:
            raise invalid_argument("INVALID_ALLOCATION", "allocation must be FIXED_SPLIT or BANDIT")
        portfolio = self.gw.portfolio
        tenant = _tenant()
        arms = []
        for a in e.arms:
            if portfolio.model(a.model) is None:
                raise invalid_argument("UNKNOWN_MODEL", f"arm {a.arm!r}: model {a.model!r} is not in the portfolio")
            version_ref = ""
            if a.prompt_version:
                tid, number = parse_version_name(a.prompt_version)
                await asyncio.to_thread(self.gw.prompts.get_version, tenant, tid, number)
                version_ref = f"promptTemplates/{tid}/versions/{number}"
            arms.append(Arm(a.arm, a.model, version_ref, a.weight if a.weight else 1.0))
        info = await asyncio.to_thread(
            self.gw.experiments.create, tenant, request.experiment_id, allocation, arms, e.cost_weight
        )
        return pb.CreateExperimentResponse(experiment=experiment_pb(info))

    async def GetExperiment(self, request: pb.GetExperimentRequest, context: grpc.aio.ServicerContext) -> pb.GetExperimentResponse:
        info = await asyncio.to_thread(self.gw.experiments.get, _tenant(), parse_experiment_name(request.name))
        return pb.GetExperimentResponse(experiment=experiment_pb(info))

    async def ListExperiments(
        self, request: pb.ListExperimentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListExperimentsResponse:
        size = page_size(request.page_size)
        after = str((decode_page_token(request.page_token) or {}).get("after", ""))
        items = await asyncio.to_thread(self.gw.experiments.list, _tenant(), after, size + 1)
        nxt = encode_page_token({"after": items[size - 1].experiment_id}) if len(items) > size else ""
        return pb.ListExperimentsResponse(experiments=[experiment_pb(i) for i in items[:size]], next_page_token=nxt)

    async def StopExperiment(self, request: pb.StopExperimentRequest, context: grpc.aio.ServicerContext) -> pb.StopExperimentResponse:
        info = await asyncio.to_thread(self.gw.experiments.stop, _tenant(), parse_experiment_name(request.name))
        return pb.StopExperimentResponse(experiment=experiment_pb(info))
