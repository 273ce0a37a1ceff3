"""Knobs of the router service (`LLMO_ROUTER_*`)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from llmo.core.settings import DEFAULT_HTTP_PORTS, ServiceSettings, platform_fallback


class RouterSettings(ServiceSettings):
    service: ClassVar[str] = "router"

    # OpenAI-compatible HTTP front; 0 picks 8080, -1 disables it.
    http_port: int = 0
    # Largest accepted HTTP request body; larger ones get 413 BODY_TOO_LARGE (a JSON error).
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    # Portfolio YAML (models and providers); empty: <data_dir>/router/portfolio.yaml.
    portfolio_path: str = ""
    # Seconds between checks of the portfolio file for changes (hot reload).
    portfolio_reload_s: float = 2.0
    # Trained complexity-router artifact directory; empty: learned routing off.
    learned_router_dir: str = ""
    # Cost service "host:port" for CheckBudget before each completion; unset: LLMO_COST_ADDRESS
    # (`llmo up` sets it); empty: no budget checks.
    cost_target: str = Field(default="", json_schema_extra=platform_fallback("cost_address"))
    # Where the default portfolio (written when portfolio_path does not exist) sends traffic:
    # the inference service's OpenAI-compatible HTTP base URL (unset: LLMO_INFERENCE_HTTP_URL, else
    # this default) and its served model.
    inference_http_url: str = Field(default="http://127.0.0.1:8000", json_schema_extra=platform_fallback("inference_http_url"))
    inference_model: str = "llmo-demo"
    # API key the router presents to the cost service. With authentication on there, its
    # tenant must be one of the cost service's LLMO_ADMIN_TENANTS (it checks end tenants'
    # budgets); a refused check fails the completion instead of skipping the budget.
    cost_api_key: str = ""
    # Deadline for CheckBudget; on timeout the request is allowed (fail open) and logged.
    budget_timeout_s: float = 0.5
    # Semantic cache.
    cache_enabled: bool = True
    cache_ttl_s: float = 600.0
    cache_similarity: float = 0.95
    cache_max_entries: int = 10_000
    # Start the next model in the chain when the first has sent nothing after this long (0: off).
    hedge_after_ms: float = 0.0
    # Local causal-LM directory for token-level pruning; empty: the inference service's
    # bundled demo model when installed; "none": token pruning off.
    compression_model_dir: str = ""
    # Publish llmo.router.v1.routed/completed and consume llmo.evaluation.v1.scored.
    events: bool = True
    consumer_name: str = "router"
    # Share of llmo.router.v1.completed events that carry their content (the last user message and
    # the answer, each cut to 16 KiB) so the evaluation service can score live traffic; chosen by a
    # hash of the request id. 0 (the default) keeps user text off the bus; `llmo up` sets 1.
    event_content_sample: float = Field(default=0.0, ge=0.0, le=1.0)
    # Metrics of llmo.evaluation.v1.scored whose scores reward the bandits, comma-separated
    # (e.g. "answer_relevancy"); empty: every score of a routed request.
    reward_metrics: str = ""

    def resolved_http_port(self) -> int | None:
        if self.http_port < 0:
            return None
        return self.http_port or DEFAULT_HTTP_PORTS["router"]
