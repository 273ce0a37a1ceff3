"""Adapters between the gateway and the rest of the platform: the cost service's
CheckBudget, NATS events (publish routed/completed, consume evaluation scores) and the
learned complexity router artifact."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from llmo.core.client import create_channel, outgoing_metadata
from llmo.core.content import completion_content, sampled
from llmo.core.errors import ServiceError, failed_precondition
from llmo.core.events import Delivery, EventBus, EventPublisher
from llmo.core.logging import get_logger
from llmo.embedding import Embedder
from llmo.protos.common.v1 import common_pb2
from llmo.protos.cost.v1 import cost_service_pb2, cost_service_pb2_grpc
from llmo.protos.events.v1 import events_pb2
from llmo.router.feedback import FeedbackRecorder
from llmo.router.gateway import BudgetVerdict, Finished, GatewayRequest, Prepared
from llmo.router.learned.model import ComplexityRouter
from llmo.router.portfolio import Portfolio

log = get_logger(__name__)

_DECISIONS = {
    cost_service_pb2.BUDGET_DECISION_ALLOW: "allow",
    cost_service_pb2.BUDGET_DECISION_DOWNGRADE: "downgrade",
    cost_service_pb2.BUDGET_DECISION_DENY: "deny",
}


# The cost service refusing the router itself is a misconfiguration, not an outage:
# failing open would silently stop enforcing every budget.
_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class CostBudgetChecker:
    """CheckBudget against the cost service. Fails open (allow) if the service is down or
    slow, so an outage of the cost service does not take completions down with it; fails
    the request (FAILED_PRECONDITION, ``BUDGET_CHECK_REFUSED``) if the cost service refuses
    the router's credentials.

    It checks budgets of end tenants, so with API keys on, ``api_key`` must belong to a
    tenant listed in the cost service's LLMO_ADMIN_TENANTS (services/cost/README.md,
    Tenants and access)."""

    def __init__(self, target: str, timeout_s: float = 0.5, api_key: str = "") -> None:
        self.channel = create_channel(target, max_attempts=2)
        self.stub = cost_service_pb2_grpc.CostServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.api_key = api_key

    async def close(self) -> None:
        await self.channel.close()

    async def check(
        self, tenant: str, application: str, model: str, estimated_cost_micros: int, request_id: str,
        input_tokens: int = 0, max_output_tokens: int = 0,
    ) -> BudgetVerdict:
        req = cost_service_pb2.CheckBudgetRequest(
            tenant=tenant,
            application=application,
            model=model,
            estimated_cost=common_pb2.Money(currency_code="USD", micros=estimated_cost_micros),
            request_id=request_id,
            estimated_usage=common_pb2.Usage(input_tokens=input_tokens, output_tokens=max_output_tokens),
        )
        try:
            resp = await self.stub.CheckBudget(req, timeout=self.timeout_s, metadata=outgoing_metadata(self.api_key))
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _REFUSALS:
                log.error("router.budget_check_refused", code=exc.code().name, detail=exc.details())
                raise failed_precondition(
                    "BUDGET_CHECK_REFUSED",
                    f"the cost service refused the router's budget check ({exc.code().name}: {exc.details()}); "
                    "set LLMO_ROUTER_COST_API_KEY to a key of an admin tenant of the cost service",
                    cost_status=exc.code().name,
                ) from exc
            log.warning("router.budget_check_failed", code=exc.code().name, detail=exc.details())
            return BudgetVerdict("allow", reason=f"cost service unavailable ({exc.code().name})")
        return BudgetVerdict(
            decision=_DECISIONS.get(resp.decision, "allow"),
            reason=resp.reason,
            budget=resp.budget,
            limit_micros=resp.limit.micros,
            spent_micros=resp.spent.micros,
            remaining_micros=resp.remaining.micros,
            downgrade_model=resp.downgrade_model,
            reservation_id=resp.reservation_id,
        )

    async def release(self, reservation_id: str) -> None:
        try:
            await self.stub.ReleaseReservation(
                cost_service_pb2.ReleaseReservationRequest(reservation_id=reservation_id),
                timeout=self.timeout_s,
                metadata=outgoing_metadata(self.api_key),
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("router.release_reservation_failed", code=exc.code().name, reservation=reservation_id)


def _money(micros: int) -> common_pb2.Money:
    return common_pb2.Money(currency_code="USD", micros=micros)


class NatsEventSink:
    def __init__(self, bus: EventPublisher, portfolio: Callable[[], Portfolio] | None = None, *,
                 content_sample: float = 0.0) -> None:
        self.bus = bus
        self.portfolio = portfolio
        # Share of completed events carrying their text (RouterSettings.event_content_sample).
        self.content_sample = content_sample

    def provider_of(self, model: str) -> str:
        found = self.portfolio().model(model) if self.portfolio is not None else None
        return found.provider if found is not None else ""

    def base_model_of(self, model: str) -> str:
        """The base model a portfolio LoRA adapter runs on ("" for a model of its own)."""
        found = self.portfolio().model(model) if self.portfolio is not None else None
        return (found.base_model or "") if found is not None else ""

    def served_name(self, model: str) -> str:
        """The name the upstream serves a portfolio model under (what prices and the
        upstream's own usage events use)."""
        found = self.portfolio().model(model) if self.portfolio is not None else None
        return found.upstream_name if found is not None else model

    async def routed(self, request: GatewayRequest, prepared: Prepared) -> None:
        d = prepared.decision
        estimate = d.model.cost_micros(prepared.input_tokens, min(request.max_tokens or d.model.max_output_tokens, d.model.max_output_tokens))
        event = events_pb2.RouterRouted(
            event_id=str(uuid.uuid4()),
            request_id=prepared.request_id,
            attribution=common_pb2.Attribution(tenant=request.tenant, application=request.application, user=request.user),
            policy=d.policy,
            model=d.model.name,
            provider=d.model.provider,
            reason=d.reason,
            estimated_cost=_money(estimate),
            prompt_version=d.prompt_version,
            experiment=d.experiment,
            arm=d.arm,
        )
        event.occurred_at.GetCurrentTime()
        await self.bus.publish(event)

    async def completed(
        self, request: GatewayRequest, prepared: Prepared, finished: Finished, latency_ms: float, ttft_ms: float, status: str,
        output: str = "",
    ) -> None:
        event = events_pb2.RouterCompleted(
            event_id=f"{prepared.request_id}:completed",
            request_id=prepared.request_id,
            attribution=common_pb2.Attribution(tenant=request.tenant, application=request.application, user=request.user),
            model=self.served_name(finished.model),
            base_model=self.base_model_of(finished.model),
            provider=self.provider_of(finished.model),
            usage=common_pb2.Usage(input_tokens=finished.usage.uncached_prompt_tokens,
                                   cached_input_tokens=finished.usage.cached_tokens,
                                   output_tokens=finished.usage.completion_tokens),
            estimated_cost=_money(finished.cost_micros),
            latency=common_pb2.Latency(ttft_ms=ttft_ms, e2e_ms=latency_ms),
            cache_hit=finished.cache_hit,
            route_reason=prepared.decision.reason,
            prompt_version=prepared.decision.prompt_version,
            fallbacks=finished.fallbacks,
            status=status,
            tokens_saved=prepared.tokens_saved,
        )
        if status == "ok" and output and sampled(prepared.request_id, self.content_sample):
            asked = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
            event.content.CopyFrom(completion_content(asked, output))
        event.occurred_at.GetCurrentTime()
        await self.bus.publish(event)


class ScoreConsumer:
    """Feeds `llmo.evaluation.v1.scored` events for routed requests into the bandits."""

    def __init__(self, bus: EventBus, recorder: FeedbackRecorder, durable: str, reward_metrics: str = "") -> None:
        self.recorder = recorder
        # Empty: every score rewards; else only these metrics (RouterSettings.reward_metrics).
        self.reward_metrics = {m.strip() for m in reward_metrics.split(",") if m.strip()}
        self.consumer = bus.consumer(events_pb2.EvaluationScored, durable, self.handle)

    async def start(self) -> None:
        await self.consumer.bus.ensure_stream("evaluation")
        self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()

    async def handle(self, deliveries: list[Delivery[events_pb2.EvaluationScored]]) -> None:
        for d in deliveries:
            ev = d.event
            if not ev.request_id or (self.reward_metrics and ev.metric not in self.reward_metrics):
                continue
            try:
                await asyncio.to_thread(self.recorder.record, None, ev.request_id, float(ev.score), d.event_id)
            except ServiceError as err:
                if err.reason == "REQUEST_NOT_FOUND":
                    continue  # scored traffic that did not go through this router
                d.reject(err.reason, err.message)


class LearnedScorer:
    """Scores prompts with a trained ComplexityRouter; threshold from the portfolio's strong share."""

    def __init__(self, router: ComplexityRouter, embedder: Embedder, strong_share: float) -> None:
        self.router = router
        self.embedder = embedder
        self.strong_share = strong_share

    @classmethod
    def load(cls, directory: Path, embedder: Embedder, strong_share: float) -> LearnedScorer:
        return cls(ComplexityRouter.load(directory), embedder, strong_share)

    def threshold_for_strong_share(self, share: float) -> float:
        return self.router.threshold_for_strong_share(share)

    def _score(self, text: str) -> float:
        return float(self.router.score_prompts([text], self.embedder.encode)[0])

    async def __call__(self, text: str) -> tuple[float, float, str]:
        score = await asyncio.to_thread(self._score, text)
        return score, self.router.threshold_for_strong_share(self.strong_share), self.router.version


def encoder_of(embedder: Embedder):  # type: ignore[no-untyped-def]
    def encode(texts: list[str]) -> np.ndarray:
        return embedder.encode(texts)

    return encode
