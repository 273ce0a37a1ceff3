"""The gateway: one pipeline behind both the gRPC `Complete`/`Route` RPCs and the
OpenAI-compatible HTTP front.

For each request: render the prompt template, compress and prune the context, route
(explicit, experiment, learned, bandit or constraints), look in the semantic cache, check
the budget with the cost service (before any model call), then stream from the chosen
model down its fallback chain with per-provider breakers, retries with jitter (only on
retryable errors and only before any text was sent) and optional hedging. A provider that
fails mid-stream is cut off and the next model continues the answer from the text already
sent (the partial answer is passed as a final assistant message), so the client sees one
unbroken stream. Emits `llmo.router.v1.routed` and `llmo.router.v1.completed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from llmo.core.errors import ServiceError, invalid_argument, resource_exhausted, unavailable
from llmo.core.logging import get_logger
from llmo.router import policies
from llmo.router.bandit import BanditStore, cost_penalised_reward
from llmo.router.cache import CachedAnswer, SemanticCache
from llmo.router.context import Message, compress_text, prune_history
from llmo.router.experiments import ExperimentStore, parse_experiment_name
from llmo.router.lingua import SurprisalPruner
from llmo.router.portfolio import Model, Portfolio, ProviderKind
from llmo.router.prompts import PromptRegistry, parse_template_name
from llmo.router.providers.base import ChatRequest, Chunk, ProviderClient, ProviderError, Usage
from llmo.router.providers.openai_http import OpenAIHttpClient
from llmo.router.resilience import BreakerBoard, backoff_delay
from llmo.router.sampling import Sampling
from llmo.router.tokens import count_message_tokens, count_tokens

log = get_logger(__name__)

ROLES = frozenset({"system", "user", "assistant", "tool"})
POLICIES = frozenset({"", policies.EXPLICIT, policies.CONSTRAINTS, policies.LEARNED, policies.BANDIT})
# Reward scale: a request costing this much loses `cost_weight` of its quality reward.
COST_SCALE_MICROS = 10_000


@dataclass(frozen=True)
class PromptSpec:
    template: str
    version: int = 0
    label: str = ""
    variables: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GatewayRequest:
    tenant: str
    messages: list[Message]
    prompt: PromptSpec | None = None
    policy: str = ""  # "", explicit, constraints, learned, bandit
    model: str = ""
    constraints: policies.Constraints = field(default_factory=policies.Constraints)
    strong_share: float | None = None
    max_prompt_tokens: int = 0
    compress_message_tokens: int = 0
    token_keep_ratio: float = 0.0
    max_tokens: int = 0
    sampling: Sampling = field(default_factory=Sampling)
    experiment: str = ""
    user: str = ""
    application: str = ""
    skip_cache: bool = False
    request_id: str = ""
    # False when the client wants the whole answer at once (non-streaming HTTP).
    stream: bool = True


@dataclass
class Prepared:
    request_id: str
    messages: list[Message]
    decision: policies.Decision
    input_tokens: int
    tokens_saved: int


@dataclass(frozen=True)
class Started:
    request_id: str
    decision: policies.Decision
    input_tokens: int
    tokens_saved: int


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    model: str
    finish_reason: str
    usage: Usage
    cost_micros: int
    cache_hit: bool
    fallbacks: int


GatewayEvent = Started | Delta | Finished


class BudgetChecker(Protocol):
    async def check(
        self, tenant: str, application: str, model: str, estimated_cost_micros: int, request_id: str,
        input_tokens: int = 0, max_output_tokens: int = 0,
    ) -> BudgetVerdict:
        """`model` is the name the upstream serves (what the ledger prices); the token counts let
        the cost service reserve at its own price when that is higher than the router's."""
        ...

    async def release(self, reservation_id: str) -> None: ...


@dataclass(frozen=True)
class BudgetVerdict:
    decision: str  # "allow", "downgrade", "deny"
    reason: str = ""
    budget: str = ""
    limit_micros: int = 0
    spent_micros: int = 0
    remaining_micros: int = 0
    downgrade_model: str = ""
    reservation_id: str = ""


class EventSink(Protocol):
    async def routed(self, request: GatewayRequest, prepared: Prepared) -> None: ...

    async def completed(
        self, request: GatewayRequest, prepared: Prepared, finished: Finished, latency_ms: float, ttft_ms: float, status: str,
        output: str = "",
    ) -> None: ...


LearnedScorer = Callable[[str], Awaitable[tuple[float, float, str]]]


def _provider_client(portfolio: Portfolio, model: Model) -> ProviderClient:
    provider = portfolio.provider_of(model)
    if provider.kind == ProviderKind.OPENAI:
        assert provider.base_url is not None
        return OpenAIHttpClient(
            provider.base_url,
            provider.api_key(),
            connect_timeout_s=provider.connect_timeout_s,
            first_token_timeout_s=provider.first_token_timeout_s,
            idle_timeout_s=provider.idle_timeout_s,
            total_timeout_s=provider.timeout_s,
        )
    from llmo.router.providers.inference_grpc import InferenceGrpcClient

    assert provider.target is not None
    return InferenceGrpcClient(
        provider.target,
        provider.api_key(),
        first_token_timeout_s=provider.first_token_timeout_s,
        idle_timeout_s=provider.idle_timeout_s,
        total_timeout_s=provider.timeout_s,
    )


class Gateway:
    def __init__(
        self,
        portfolio: Callable[[], Portfolio],
        *,
        bandit: BanditStore,
        prompts: PromptRegistry,
        experiments: ExperimentStore,
        learned: LearnedScorer | None = None,
        cache: SemanticCache | None = None,
        budget: BudgetChecker | None = None,
        events: EventSink | None = None,
        encoder: Callable[[Any], Any] | None = None,
        hedge_after_s: float = 0.0,
        retry_base_s: float = 0.05,
        pruner: SurprisalPruner | None = None,
    ) -> None:
        self._portfolio = portfolio
        self.bandit = bandit
        self.prompts = prompts
        self.experiments = experiments
        self.learned = learned
        self.cache = cache
        self.budget = budget
        self.events = events
        self.encoder = encoder
        self.hedge_after_s = hedge_after_s
        self.retry_base_s = retry_base_s
        self.pruner = pruner
        self.breakers = BreakerBoard()
        self._clients: dict[tuple[str, int], ProviderClient] = {}

    @property
    def portfolio(self) -> Portfolio:
        return self._portfolio()

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    def client_for(self, model: Model) -> ProviderClient:
        portfolio = self.portfolio
        provider = portfolio.provider_of(model)
        # Providers are frozen pydantic models: equal config -> equal hash -> same client.
        key = (model.provider, hash(provider))
        client = self._clients.get(key)
        if client is None:
            client = _provider_client(portfolio, model)
            self._clients[key] = client
        return client

    # ------------------------------------------------------------------ preparation

    async def prepare(self, req: GatewayRequest) -> Prepared:
        if not req.messages:
            raise invalid_argument("EMPTY_MESSAGES", "messages must not be empty")
        for i, m in enumerate(req.messages):
            if m.role not in ROLES:
                raise invalid_argument("INVALID_ROLE", f"messages[{i}].role {m.role!r} is not one of {sorted(ROLES)}")
        if req.max_tokens < 0:
            raise invalid_argument("INVALID_MAX_TOKENS", "max_tokens must be >= 0", field="max_tokens")
        if req.policy not in POLICIES:
            raise invalid_argument(
                "INVALID_POLICY", f"policy must be one of {sorted(POLICIES - {''})}", field="policy"
            )
        if req.strong_share is not None and not (math.isfinite(req.strong_share) and 0.0 <= req.strong_share <= 1.0):
            raise invalid_argument("INVALID_STRONG_SHARE", "strong_share must be in [0, 1]", field="strong_share")
        req.sampling.check()
        request_id = req.request_id or f"rtr-{uuid.uuid4().hex}"
        messages = list(req.messages)
        prompt_version = ""
        experiment_id = ""
        arm_name = ""
        arm_model = ""
        exp_reason = ""
        if req.experiment:
            experiment_id = parse_experiment_name(req.experiment)
            _info, arm, exp_reason = await asyncio.to_thread(
                self.experiments.assign, req.tenant, experiment_id, req.user or req.tenant
            )
            arm_name, arm_model = arm.arm, arm.model
            if arm.prompt_version:
                # The arm's prompt version wins; the request supplies the variables.
                tid, _, version = arm.prompt_version.partition("/versions/")
                variables = dict(req.prompt.variables) if req.prompt is not None else {}
                req = _with_prompt(req, PromptSpec(tid, int(version or 0), variables=variables))
        if req.prompt is not None:
            tid = parse_template_name(req.prompt.template) if req.prompt.template.startswith("promptTemplates/") else ""
            if not tid:
                tid = parse_template_name(f"promptTemplates/{req.prompt.template}")
            text, version_info = await asyncio.to_thread(
                self.prompts.render, req.tenant, tid, dict(req.prompt.variables), req.prompt.version, req.prompt.label
            )
            prompt_version = version_info.name
            messages.insert(0, Message("system", text))
        # Tokenizing a large prompt is CPU work: keep it off the event loop.
        before = await asyncio.to_thread(count_message_tokens, [(m.role, m.content) for m in messages])
        if req.token_keep_ratio:
            messages = await self._prune_tokens(messages, req.token_keep_ratio)
        if req.compress_message_tokens > 0:
            messages = await asyncio.to_thread(self._compress, messages, req.compress_message_tokens)
        if req.max_prompt_tokens > 0:
            pruned = await asyncio.to_thread(prune_history, messages, req.max_prompt_tokens, self.encoder)
            messages = pruned.messages
        reduced = bool(req.token_keep_ratio) or req.compress_message_tokens > 0 or req.max_prompt_tokens > 0
        input_tokens = (
            await asyncio.to_thread(count_message_tokens, [(m.role, m.content) for m in messages]) if reduced else before
        )
        latest = next((m.content for m in reversed(messages) if m.role == "user"), messages[-1].content)
        inp = policies.RoutingInput(
            tenant=req.tenant,
            prompt_text=latest,
            input_tokens=input_tokens,
            max_tokens=req.max_tokens,
            constraints=req.constraints,
            strong_share=req.strong_share,
        )
        portfolio = self.portfolio
        if arm_model:
            decision = policies.explicit(portfolio, inp, arm_model)
            decision.policy = policies.EXPERIMENT
            decision.reason = f"experiment {experiment_id}: {exp_reason}; model {arm_model}"
        else:
            decision = await self._route(portfolio, req, inp)
        decision.experiment = f"experiments/{experiment_id}" if experiment_id else ""
        decision.arm = arm_name
        decision.prompt_version = prompt_version
        return Prepared(request_id, messages, decision, input_tokens, max(0, before - input_tokens))

    async def _prune_tokens(self, messages: list[Message], ratio: float) -> list[Message]:
        if not 0.0 < ratio <= 1.0:
            raise invalid_argument("INVALID_KEEP_RATIO", f"token_keep_ratio must be in (0, 1], got {ratio}")
        if self.pruner is None:
            from llmo.core.errors import failed_precondition

            raise failed_precondition("COMPRESSION_MODEL_UNCONFIGURED", "no local model is configured for token pruning")
        pruner = self.pruner
        last = len(messages) - 1

        def run() -> list[Message]:
            return [
                m if i == last or m.role == "system" else Message(m.role, pruner.prune(m.content, ratio).text)
                for i, m in enumerate(messages)
            ]

        return await asyncio.to_thread(run)

    @staticmethod
    def _compress(messages: list[Message], budget: int) -> list[Message]:
        out = []
        last = len(messages) - 1
        for i, m in enumerate(messages):
            if i != last and m.role != "system" and count_tokens(m.content) > budget:
                latest = messages[last].content
                m = Message(m.role, compress_text(m.content, budget, query=latest).text)
            out.append(m)
        return out

    async def _route(self, portfolio: Portfolio, req: GatewayRequest, inp: policies.RoutingInput) -> policies.Decision:
        policy = req.policy or ("explicit" if req.model else "")
        if policy == policies.EXPLICIT or req.model:
            if not req.model:
                raise invalid_argument("UNKNOWN_MODEL", "explicit routing needs a model")
            return policies.explicit(portfolio, inp, req.model)
        if policy == policies.BANDIT:
            return await asyncio.to_thread(policies.bandit, portfolio, inp, self.bandit)
        if policy == policies.CONSTRAINTS:
            return policies.cheapest(portfolio, inp)
        learned_ready = self.learned is not None and portfolio.routing.weak_model and portfolio.routing.strong_model
        if policy == policies.LEARNED and not learned_ready:
            from llmo.core.errors import failed_precondition

            raise failed_precondition(
                "LEARNED_ROUTING_UNCONFIGURED", "no trained router is loaded or the portfolio lacks weak/strong models"
            )
        if learned_ready and self.learned is not None:
            score, threshold, version = await self.learned(inp.prompt_text)
            share = inp.strong_share
            if share is not None and share != portfolio.routing.strong_share:
                threshold = await self._threshold_for(share)
            return policies.learned(portfolio, inp, score, threshold, version)
        if portfolio.routing.default_model:
            return policies.explicit(portfolio, inp, portfolio.routing.default_model)
        return policies.cheapest(portfolio, inp)

    async def _threshold_for(self, share: float) -> float:
        threshold_of = getattr(self.learned, "threshold_for_strong_share", None)
        if threshold_of is None:
            raise invalid_argument("INVALID_STRONG_SHARE", "the learned router cannot re-calibrate its threshold")
        if not 0.0 <= share <= 1.0:
            raise invalid_argument("INVALID_STRONG_SHARE", "strong_share must be in [0, 1]")
        return float(threshold_of(share))

    # ------------------------------------------------------------------ completion

    async def complete(self, req: GatewayRequest) -> AsyncIterator[GatewayEvent]:
        started = time.perf_counter()
        prepared = await self.prepare(req)
        decision = prepared.decision
        portfolio = self.portfolio
        # Everything that changes the answer is in the scope: a request differing in any of it misses.
        target = decision.model.name if req.model or req.experiment else "auto"
        scope = f"{target}|{req.max_tokens}|{decision.prompt_version}|{req.sampling.cache_key()}"
        pairs = [(m.role, m.content) for m in prepared.messages]
        if self.cache is not None and not req.skip_cache:
            hit = await asyncio.to_thread(self.cache.lookup, req.tenant, scope, pairs)
            if hit is not None:
                ans = hit.answer
                decision.reason = f"{hit.kind} cache hit (similarity {hit.similarity:.3f}); {decision.reason}"
                yield Started(prepared.request_id, decision, prepared.input_tokens, prepared.tokens_saved)
                yield Delta(ans.text)
                finished = Finished(ans.model, ans.finish_reason, Usage(ans.prompt_tokens, ans.completion_tokens), 0, True, 0)
                yield finished
                await self._after(req, prepared, finished, started, started, "ok", ans.text)
                return
        out_tokens = policies.output_tokens(decision.model, req.max_tokens)
        reservation = ""
        if self.budget is not None:
            decision, reservation = await self._check_budget(req, prepared, out_tokens)
        if self.events is not None:
            await self._emit(self.events.routed(req, prepared))
        yield Started(prepared.request_id, decision, prepared.input_tokens, prepared.tokens_saved)
        chain = [decision.model] + [m for name in decision.fallbacks if (m := portfolio.model(name)) is not None]
        text_parts: list[str] = []
        first_token_at: float | None = None
        finished_state: dict[str, Any] = {}
        try:
            async for item in self._run_chain(req, prepared, chain, text_parts, finished_state):
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                yield item
        except ServiceError as err:
            if reservation and self.budget is not None:
                # Nothing was spent: give the reserved estimate back to the budget.
                await self._emit(self.budget.release(reservation))
            failed = Finished(decision.model.name, "error", Usage(prepared.input_tokens, 0), 0, False, len(chain))
            await self._after(req, prepared, failed, started, first_token_at or started, err.reason)
            raise
        model: Model = finished_state["model"]
        usage: Usage = finished_state.get("usage") or Usage(prepared.input_tokens, count_tokens("".join(text_parts)))
        cost = model.cost_micros(usage.prompt_tokens, usage.completion_tokens)
        finished = Finished(model.name, finished_state["finish_reason"], usage, cost, False, finished_state["fallbacks"])
        cacheable = self.cache is not None and not req.skip_cache and finished.finish_reason in ("stop", "length")
        if cacheable and self.cache is not None:
            # The exact entry is in place before the client has its answer; the embedding
            # for similarity hits is computed after.
            answer = CachedAnswer("".join(text_parts), model.name, usage.prompt_tokens, usage.completion_tokens, finished.finish_reason)
            self.cache.store(req.tenant, scope, pairs, answer, embed=False)
        yield finished
        if cacheable and self.cache is not None:
            await asyncio.to_thread(self.cache.embed_entry, req.tenant, scope, pairs)
        await self._after(req, prepared, finished, started, first_token_at or started, "ok", "".join(text_parts))

    async def _check_budget(self, req: GatewayRequest, prepared: Prepared, out_tokens: int) -> tuple[policies.Decision, str]:
        assert self.budget is not None
        decision = prepared.decision
        estimate = decision.model.cost_micros(prepared.input_tokens, out_tokens)
        verdict = await self.budget.check(req.tenant, req.application, decision.model.upstream_name, estimate,
                                          prepared.request_id, prepared.input_tokens, out_tokens)
        if verdict.decision == "deny":
            raise resource_exhausted(
                "BUDGET_EXCEEDED",
                f"budget {verdict.budget or '(tenant)'} denies this request: {verdict.reason}",
                budget=verdict.budget,
                limit_micros=verdict.limit_micros,
                spent_micros=verdict.spent_micros,
                remaining_micros=verdict.remaining_micros,
                budget_reason=verdict.reason,
                tenant=req.tenant,
            )
        if verdict.decision == "downgrade":
            portfolio = self.portfolio
            target = portfolio.model(verdict.downgrade_model) if verdict.downgrade_model else None
            if target is None:
                eligible = [c for c in decision.candidates if c.eligible and "context" not in c.note]
                cheaper = sorted(eligible, key=lambda c: c.cost_micros)
                target = portfolio.model(cheaper[0].model) if cheaper else None
            if target is not None and target.name != decision.model.name:
                old = decision.model.name
                decision.model = target
                decision.policy = policies.BUDGET_DOWNGRADE
                decision.reason = f"budget {verdict.budget} ({verdict.reason}): downgraded {old} -> {target.name}; was: {decision.reason}"
                decision.fallbacks = [m.name for m in portfolio.fallback_chain(target.name)[1:]]
        return decision, verdict.reservation_id

    async def _run_chain(
        self,
        req: GatewayRequest,
        prepared: Prepared,
        chain: list[Model],
        text_parts: list[str],
        state: dict[str, Any],
    ) -> AsyncIterator[Delta]:
        portfolio = self.portfolio
        errors: list[str] = []
        base_messages = [{"role": m.role, "content": m.content} for m in prepared.messages]
        for index, model in enumerate(chain):
            provider = portfolio.provider_of(model)
            breaker = self.breakers.get(model.provider, provider.breaker_failures, provider.breaker_reset_s)
            attempt = 0
            while True:
                if not breaker.allow():
                    errors.append(f"{model.name}: circuit open")
                    break
                messages = list(base_messages)
                extra: dict[str, Any] = {}
                if text_parts:
                    messages.append({"role": "assistant", "content": "".join(text_parts)})
                    if provider.continue_final_message:
                        extra = {"continue_final_message": True, "add_generation_prompt": False}
                upstream = ChatRequest(
                    model=model.upstream_name,
                    messages=messages,
                    max_tokens=policies.output_tokens(model, req.max_tokens),
                    sampling=req.sampling,
                    extra=extra,
                    stream=req.stream or bool(self.hedge_after_s),
                    request_id=prepared.request_id,
                    tenant=req.tenant,
                    application=req.application,
                    user=req.user,
                )
                sent_before = len(text_parts)
                try:
                    async for chunk in self._stream_with_hedge(model, upstream, chain[index + 1 :]):
                        if chunk.usage is not None:
                            state["usage"] = chunk.usage
                        if chunk.text:
                            text_parts.append(chunk.text)
                            yield Delta(chunk.text)
                        if chunk.finish_reason is not None:
                            state["finish_reason"] = chunk.finish_reason
                    if "finish_reason" not in state:
                        raise ProviderError("UPSTREAM_TRUNCATED", "stream ended without a finish reason", retryable=True)
                    breaker.record_success()
                    state["model"] = model
                    state["fallbacks"] = index
                    return
                except ProviderError as err:
                    if err.client_error:
                        # The caller's request was refused: the provider is healthy, and one
                        # tenant's bad requests must not open the breaker for everyone.
                        breaker.record_neutral()
                        log.info("router.upstream_rejected_request", model=model.name, reason=err.reason, status=err.status)
                        details = {"field": err.param} if err.param else {}
                        raise invalid_argument(
                            "UPSTREAM_REJECTED_REQUEST", err.message, model=model.name,
                            upstream_status=str(err.status or ""), **details,
                        ) from err
                    breaker.record_failure()
                    log.warning("router.provider_failed", model=model.name, reason=err.reason, error=err.message, attempt=attempt)
                    errors.append(f"{model.name}: {err.reason}")
                    state.pop("finish_reason", None)
                    if err.retryable and len(text_parts) == sent_before and attempt < provider.max_retries:
                        await asyncio.sleep(backoff_delay(attempt, self.retry_base_s))
                        attempt += 1
                        continue
                    break
        raise unavailable(
            "ALL_PROVIDERS_FAILED",
            "every model in the fallback chain failed: " + "; ".join(errors),
            tried=",".join(m.name for m in chain),
            last_error=errors[-1] if errors else "",
        )

    async def _stream_with_hedge(self, model: Model, upstream: ChatRequest, rest: list[Model]) -> AsyncIterator[Chunk]:
        """Stream from `model`; with hedging on and no first chunk after `hedge_after_s`,
        also start the next model and keep whichever answers first."""
        primary = self.client_for(model).stream(upstream)
        if self.hedge_after_s <= 0 or not rest or upstream.messages[-1]["role"] == "assistant":
            async for chunk in primary:
                yield chunk
            return
        first_task = asyncio.ensure_future(anext(primary))
        done, _ = await asyncio.wait({first_task}, timeout=self.hedge_after_s)
        if done:
            winner, first = primary, first_task.result()
        else:
            backup_model = rest[0]
            hedge_req = replace(upstream, model=backup_model.upstream_name, extra={})
            backup = self.client_for(backup_model).stream(hedge_req)
            backup_task = asyncio.ensure_future(anext(backup))
            done, pending = await asyncio.wait({first_task, backup_task}, return_when=asyncio.FIRST_COMPLETED)
            ok = [t for t in done if t.exception() is None]
            pick = first_task if first_task in ok else (backup_task if backup_task in ok else None)
            if pick is None:
                # Both failed before their first chunk: surface the primary's error.
                for t in pending:
                    t.cancel()
                await _close(backup)
                await _close(primary)
                first_task.result()
            for t in pending:
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
            winner = primary if pick is first_task else backup
            loser = backup if winner is primary else primary
            await _close(loser)
            assert pick is not None
            first = pick.result()
            log.info("router.hedged", primary=model.name, backup=backup_model.name, winner="primary" if winner is primary else "backup")
        yield first
        async for chunk in winner:
            yield chunk

    async def _emit(self, coro: Awaitable[None]) -> None:
        try:
            await coro
        except Exception as exc:
            log.warning("router.event_publish_failed", error=str(exc))

    async def _after(
        self, req: GatewayRequest, prepared: Prepared, finished: Finished, started: float, first_token_at: float, status: str,
        output: str = "",
    ) -> None:
        latency_ms = (time.perf_counter() - started) * 1000
        ttft_ms = (first_token_at - started) * 1000
        try:
            await asyncio.to_thread(self._record, req, prepared, finished, latency_ms, status)
        except Exception as exc:
            log.warning("router.record_failed", error=str(exc))
        if self.events is not None:
            await self._emit(self.events.completed(req, prepared, finished, latency_ms, ttft_ms, status, output))

    def _record(self, req: GatewayRequest, prepared: Prepared, finished: Finished, latency_ms: float, status: str) -> None:
        from llmo.router.feedback import record_request

        decision = prepared.decision
        scope = "models" if decision.policy == policies.BANDIT else ""
        arm = finished.model if scope else decision.arm
        if decision.experiment:
            scope = self.experiments.scope(decision.experiment.removeprefix("experiments/"))
            if status == "ok":
                self.experiments.record_request(
                    req.tenant, decision.experiment.removeprefix("experiments/"), decision.arm, finished.cost_micros, latency_ms
                )
        record_request(
            self.bandit.engine,
            request_id=prepared.request_id,
            tenant=req.tenant,
            model=finished.model,
            scope=scope,
            arm=arm,
            experiment=decision.experiment,
            cost_micros=finished.cost_micros,
            latency_ms=latency_ms,
        )

    def reward(self, cost_micros: int, quality: float, cost_weight: float) -> float:
        return cost_penalised_reward(quality, cost_micros, cost_weight, COST_SCALE_MICROS)


def _with_prompt(req: GatewayRequest, prompt: PromptSpec) -> GatewayRequest:
    return replace(req, prompt=prompt)


async def _close(stream: AsyncIterator[Chunk]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(BaseException):
            await aclose()
