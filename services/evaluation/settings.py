"""Knobs of the evaluation service (`LLMO_EVALUATION_*`)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from llmo.core.settings import ServiceSettings, platform_fallback


class EvaluationSettings(ServiceSettings):
    service: ClassVar[str] = "evaluation"

    judge_url: str = Field(default="", json_schema_extra=platform_fallback("router_http_url"))
    """OpenAI-compatible base URL of the judge (`/v1` is appended when missing). Unset: the router's
    (`LLMO_ROUTER_HTTP_URL`, set by `llmo up`), so judging is routed and metered like any traffic;
    empty everywhere: no judge, and metrics that need one (G-Eval, pairwise) fail with
    FAILED_PRECONDITION JUDGE_NOT_CONFIGURED while faithfulness, relevancy and context metrics use the
    local detector and MiniLM."""
    judge_api_key: str = ""
    """Bearer key of this service at the judge. At the router it should be an admin tenant's key: the
    service names the tenant being evaluated in `x-llmo-tenant`, so judge calls are charged to that
    tenant, never to the evaluation service."""
    judge_model: str = "auto"
    """Judge model when a request names none (`auto`: the router chooses)."""
    judge_timeout_s: float = Field(default=30.0, gt=0)
    """Deadline of one judge call (never past the RPC's own deadline)."""
    judge_retries: int = Field(default=2, ge=0, le=10)
    """Retries of a judge call that timed out or found the judge unavailable (jittered backoff)."""
    judge_concurrency: int = Field(default=8, ge=1, le=256)
    """Judge calls in flight at once, over every run and request."""
    judge_cache_entries: int = Field(default=10_000, ge=0)
    """Identical judge calls (same tenant, model, prompt and sampling) answered from memory."""
    target_url: str = Field(default="", json_schema_extra=platform_fallback("router_http_url"))
    """OpenAI-compatible base URL that generates outputs for examples that carry none (a run's
    `target`). Unset: the router's; empty: runs whose examples lack outputs fail with MISSING_TARGET."""
    target_timeout_s: float = Field(default=120.0, gt=0)
    """Deadline of one target generation."""
    target_max_tokens: int = Field(default=512, ge=1)
    """Most tokens a target generation may write."""
    max_active_runs: int = Field(default=4, ge=1)
    """PENDING or RUNNING runs one tenant may have; past it CreateRun fails with TOO_MANY_ACTIVE_RUNS."""
    run_workers: int = Field(default=2, ge=1)
    """Runs executed at once (the others wait in PENDING)."""
    run_example_concurrency: int = Field(default=8, ge=1)
    """Examples of one run scored at once."""
    max_examples_per_dataset: int = Field(default=100_000, ge=1)
    """Largest dataset accepted; past it example creation fails with DATASET_FULL."""
    consume_events: bool = True
    """Score a sample of live traffic: consume `llmo.router.v1.completed` and
    `llmo.inference.v1.completed` (the events that carry their content) and publish
    `llmo.evaluation.v1.scored`, which the router's bandits consume."""
    consumer_name: str = "evaluation"
    online_sources: str = "router,inference"
    """Which completed events online evaluation reads: `router`, `inference`, or both."""
    online_sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of completed events (that carry content) scored, chosen by a hash of the request id so
    every replica picks the same ones."""
    online_metrics: str = "answer_relevancy,faithfulness"
    """Metrics scored on live traffic, comma-separated names as in MetricResult.metric:
    answer_relevancy, faithfulness, hallucination, context_relevancy (context metrics only when the
    event carries contexts)."""
    online_use_judge: bool = False
    """Score live traffic with the judge (costs a judge call per sampled request, charged to the
    request's tenant) instead of the local detector and MiniLM."""
    publish_events: bool = True
    """Publish `llmo.evaluation.v1.scored` (every score) and `llmo.evaluation.v1.drift_detected`."""
    drift_check_interval_s: float = Field(default=300.0, ge=0.0)
    """Seconds between drift checks of live-traffic scores (0: no background checks; GetDriftReport
    still works)."""
    drift_window_s: float = Field(default=3600.0, gt=0)
    """Length of the current window a drift check reads (ending now)."""
    drift_baseline_s: float = Field(default=86_400.0, gt=0)
    """Length of the reference window just before the current one."""
    drift_min_samples: int = Field(default=30, ge=2)
    """Fewest scores per window for a background drift check."""
