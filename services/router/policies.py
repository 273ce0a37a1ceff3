"""Routing policies. Each returns a `Decision` that explains itself: every candidate with
its predicted quality, estimated cost and latency, why it is or is not eligible, the chosen
model, the reason and the fallback chain."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from llmo.core.errors import failed_precondition, invalid_argument
from llmo.router.bandit import BanditStore
from llmo.router.portfolio import Capability, Model, Portfolio

EXPLICIT = "explicit"
CONSTRAINTS = "constraints"
LEARNED = "learned"
BANDIT = "bandit"
EXPERIMENT = "experiment"
BUDGET_DOWNGRADE = "budget_downgrade"


@dataclass(frozen=True)
class Constraints:
    max_cost_micros: int = 0
    max_ttft_ms: float = 0.0
    required_capabilities: frozenset[str] = frozenset()
    min_quality: float = 0.0


@dataclass(frozen=True)
class CandidateView:
    model: str
    provider: str
    predicted_quality: float
    cost_micros: int
    predicted_ttft_ms: float
    eligible: bool
    note: str


@dataclass
class Decision:
    policy: str
    model: Model
    reason: str
    candidates: list[CandidateView]
    fallbacks: list[str] = field(default_factory=list)
    experiment: str = ""
    arm: str = ""
    prompt_version: str = ""


@dataclass(frozen=True)
class RoutingInput:
    tenant: str
    prompt_text: str  # the latest user message, which the learned router scores
    input_tokens: int
    max_tokens: int
    constraints: Constraints = Constraints()
    strong_share: float | None = None


LearnedScorer = Callable[[str], float]


def _check_capabilities(required: frozenset[str]) -> None:
    valid = {c.value for c in Capability}
    unknown = sorted(required - valid)
    if unknown:
        raise invalid_argument(
            "UNKNOWN_CAPABILITY", f"unknown capabilities {unknown}; valid: {sorted(valid)}", unknown=",".join(unknown)
        )


def output_tokens(model: Model, requested: int) -> int:
    return min(requested, model.max_output_tokens) if requested > 0 else model.max_output_tokens


def assess(portfolio: Portfolio, inp: RoutingInput) -> list[CandidateView]:
    c = inp.constraints
    _check_capabilities(c.required_capabilities)
    views = []
    for m in portfolio.models:
        out_tokens = output_tokens(m, inp.max_tokens)
        cost = m.cost_micros(inp.input_tokens, out_tokens)
        problems = []
        if inp.input_tokens + out_tokens > m.context_window:
            problems.append(f"context {inp.input_tokens}+{out_tokens} > window {m.context_window}")
        if c.max_cost_micros and cost > c.max_cost_micros:
            problems.append(f"cost {cost} > max {c.max_cost_micros} micros")
        if c.max_ttft_ms and m.latency.ttft_ms > c.max_ttft_ms:
            problems.append(f"ttft {m.latency.ttft_ms:g} > max {c.max_ttft_ms:g} ms")
        missing = sorted(c.required_capabilities - {cap.value for cap in m.capabilities})
        if missing:
            problems.append(f"lacks {','.join(missing)}")
        if c.min_quality and m.quality < c.min_quality:
            problems.append(f"quality {m.quality:.2f} < min {c.min_quality:.2f}")
        views.append(
            CandidateView(
                model=m.name,
                provider=m.provider,
                predicted_quality=m.quality,
                cost_micros=cost,
                predicted_ttft_ms=m.latency.ttft_ms,
                eligible=not problems,
                note="; ".join(problems) or "eligible",
            )
        )
    return views


def _chain(portfolio: Portfolio, model: Model, views: list[CandidateView]) -> list[str]:
    fits = {v.model for v in views if "context" not in v.note}
    return [m.name for m in portfolio.fallback_chain(model.name)[1:] if m.name in fits]


def _require(portfolio: Portfolio, name: str) -> Model:
    model = portfolio.model(name)
    if model is None:
        raise invalid_argument(
            "UNKNOWN_MODEL", f"model {name!r} is not in the portfolio", model=name, known=",".join(m.name for m in portfolio.models)
        )
    return model


def explicit(portfolio: Portfolio, inp: RoutingInput, name: str) -> Decision:
    model = _require(portfolio, name)
    views = assess(portfolio, inp)
    view = next(v for v in views if v.model == name)
    if "context" in view.note:
        raise failed_precondition("CONTEXT_TOO_LONG", f"{name}: {view.note}", model=name, input_tokens=inp.input_tokens)
    return Decision(EXPLICIT, model, f"model {name} requested explicitly", views, _chain(portfolio, model, views))


def cheapest(portfolio: Portfolio, inp: RoutingInput) -> Decision:
    views = assess(portfolio, inp)
    eligible = [v for v in views if v.eligible]
    if not eligible:
        if all("context" in v.note for v in views):
            raise failed_precondition(
                "CONTEXT_TOO_LONG", "the prompt does not fit any model's context window", input_tokens=inp.input_tokens
            )
        raise failed_precondition(
            "NO_ELIGIBLE_MODEL",
            "no model meets the constraints: " + " | ".join(f"{v.model}: {v.note}" for v in views),
        )
    best = min(eligible, key=lambda v: (v.cost_micros, -v.predicted_quality, v.model))
    model = _require(portfolio, best.model)
    reason = f"cheapest of {len(eligible)} eligible models ({best.cost_micros} micros estimated)"
    return Decision(CONSTRAINTS, model, reason, views, _chain(portfolio, model, views))


def learned(portfolio: Portfolio, inp: RoutingInput, score: float, threshold: float, version: str) -> Decision:
    """Weak model unless the router's score says the strong one is needed."""
    weak_name, strong_name = portfolio.routing.weak_model, portfolio.routing.strong_model
    if weak_name is None or strong_name is None:
        raise failed_precondition("LEARNED_ROUTING_UNCONFIGURED", "portfolio routing needs weak_model and strong_model")
    views = assess(portfolio, inp)
    by_name = {v.model: v for v in views}
    want_strong = score > threshold
    first, second = (strong_name, weak_name) if want_strong else (weak_name, strong_name)
    updated = []
    for v in views:
        if v.model == weak_name:
            note = f"learned: P(strong needed)={score:.3f}, threshold {threshold:.3f}; {v.note}"
            v = CandidateView(v.model, v.provider, v.predicted_quality, v.cost_micros, v.predicted_ttft_ms, v.eligible, note)
        updated.append(v)
    choice = first if by_name[first].eligible else second
    if not by_name[choice].eligible:
        fallback = cheapest(portfolio, inp)
        fallback.reason = f"learned router ({version}) picked ineligible models; {fallback.reason}"
        fallback.candidates = updated
        return fallback
    model = _require(portfolio, choice)
    side = "strong" if choice == strong_name else "weak"
    reason = (
        f"learned router {version}: score {score:.3f} {'>' if want_strong else '<='} threshold {threshold:.3f}"
        f" -> {side} model {choice}"
    )
    if choice != first:
        reason += f" ({first} ineligible: {by_name[first].note})"
    return Decision(LEARNED, model, reason, updated, _chain(portfolio, model, views))


def bandit(portfolio: Portfolio, inp: RoutingInput, store: BanditStore, scope: str = "models") -> Decision:
    views = assess(portfolio, inp)
    arms = [v.model for v in views if v.eligible]
    if not arms:
        return cheapest(portfolio, inp)
    choice = store.choose(inp.tenant, scope, arms)
    model = _require(portfolio, choice.arm)
    ranked = ", ".join(f"{a}={choice.samples[a]:.3f}" for a in sorted(arms, key=lambda a: -choice.samples[a]))
    state = choice.states[choice.arm]
    reason = f"bandit: Thompson samples {ranked}; {choice.arm} posterior mean {state.mean:.3f} after {state.pulls} rewards"
    return Decision(BANDIT, model, reason, views, _chain(portfolio, model, views))
