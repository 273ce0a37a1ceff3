"""The model portfolio: a YAML catalog of providers and models, validated and hot-reloaded.

Example::

    providers:
      local:
        kind: llmo_inference          # our inference service over gRPC
        target: 127.0.0.1:50052
      openai:
        kind: openai                  # any OpenAI-compatible HTTP endpoint
        base_url: https://api.openai.com/v1
        api_key_env: OPENAI_API_KEY   # the key is read from this environment variable
        timeout_s: 30
    models:
      - name: small
        provider: local
        input_price_micros_per_mtok: 100000    # integer micro-dollars per million tokens
        output_price_micros_per_mtok: 200000
        context_window: 4096
        capabilities: [json]
        latency: {ttft_ms: 40, tokens_per_s: 120}
        quality: 0.62
        fallbacks: [big]
      - name: small-support              # a LoRA adapter loaded on the inference service
        provider: local
        provider_model: support-lora     # the adapter's name there
        base_model: llmo-demo
        input_price_micros_per_mtok: 100000
        output_price_micros_per_mtok: 200000
        context_window: 4096
    routing:
      weak_model: small
      strong_model: big
      strong_share: 0.3
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = structlog.get_logger(__name__)


class PortfolioError(ValueError):
    """The portfolio file is missing, is not YAML, or does not validate; the message says where."""


class ProviderKind(StrEnum):
    LLMO_INFERENCE = "llmo_inference"
    OPENAI = "openai"


class Capability(StrEnum):
    JSON = "json"
    TOOLS = "tools"
    VISION = "vision"
    STREAMING = "streaming"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Provider(_Strict):
    kind: ProviderKind
    base_url: str | None = None
    target: str | None = None
    api_key_env: str | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    connect_timeout_s: float = Field(default=3.0, gt=0)
    first_token_timeout_s: float = Field(default=10.0, gt=0)
    idle_timeout_s: float = Field(default=10.0, gt=0)
    max_retries: int = Field(default=2, ge=0, le=10)
    breaker_failures: int = Field(default=5, ge=1)
    breaker_reset_s: float = Field(default=30.0, gt=0)
    # After a mid-stream failure the next model gets the partial answer as a final
    # assistant message; servers that support it (vLLM) are also told to continue it.
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _endpoint(self) -> Provider:
        if self.kind == ProviderKind.OPENAI and not self.base_url:
            raise ValueError("an 'openai' provider needs base_url")
        if self.kind == ProviderKind.LLMO_INFERENCE and not self.target:
            raise ValueError("an 'llmo_inference' provider needs target (host:port)")
        return self

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class Latency(_Strict):
    ttft_ms: float = Field(default=500.0, ge=0)
    tokens_per_s: float = Field(default=50.0, gt=0)


class Model(_Strict):
    name: str = Field(min_length=1)
    provider: str
    provider_model: str | None = None
    input_price_micros_per_mtok: int = Field(ge=0)
    output_price_micros_per_mtok: int = Field(ge=0)
    context_window: int = Field(gt=0)
    max_output_tokens: int = Field(default=1024, gt=0)
    capabilities: frozenset[Capability] = frozenset()
    latency: Latency = Latency()
    quality: float = Field(default=0.5, ge=0.0, le=1.0)
    fallbacks: tuple[str, ...] = ()
    # A LoRA adapter served by the upstream (our inference service's LoadAdapter): the upstream name of
    # the model it runs on, carried in RouterCompleted.base_model so the cost ledger prices it like that.
    base_model: str | None = None

    @property
    def upstream_name(self) -> str:
        return self.provider_model or self.name

    def cost_micros(self, input_tokens: int, output_tokens: int) -> int:
        """Estimated cost in integer micro-dollars (rounded up)."""
        total = input_tokens * self.input_price_micros_per_mtok + output_tokens * self.output_price_micros_per_mtok
        return -(-total // 1_000_000)

    def predicted_ttft_ms(self) -> float:
        return self.latency.ttft_ms


class Routing(_Strict):
    weak_model: str | None = None
    strong_model: str | None = None
    strong_share: float = Field(default=0.3, ge=0.0, le=1.0)
    learned_router: str | None = None
    default_model: str | None = None


class Portfolio(_Strict):
    providers: dict[str, Provider]
    models: tuple[Model, ...] = Field(min_length=1)
    routing: Routing = Routing()

    @model_validator(mode="after")
    def _references(self) -> Portfolio:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model names: {', '.join(dupes)}")
        known = set(names)
        for m in self.models:
            if m.provider not in self.providers:
                raise ValueError(f"model {m.name!r}: unknown provider {m.provider!r}")
            for fb in m.fallbacks:
                if fb not in known:
                    raise ValueError(f"model {m.name!r}: unknown fallback model {fb!r}")
                if fb == m.name:
                    raise ValueError(f"model {m.name!r}: cannot fall back to itself")
        for field in ("weak_model", "strong_model", "default_model"):
            value = getattr(self.routing, field)
            if value is not None and value not in known:
                raise ValueError(f"routing.{field}: unknown model {value!r}")
        return self

    def model(self, name: str) -> Model | None:
        for m in self.models:
            if m.name == name:
                return m
        return None

    def provider_of(self, model: Model) -> Provider:
        return self.providers[model.provider]

    def fallback_chain(self, first: str) -> list[Model]:
        """`first` then its fallbacks, breadth first, each model once."""
        chain: list[Model] = []
        queue = [first]
        seen: set[str] = set()
        while queue:
            name = queue.pop(0)
            if name in seen:
                continue
            seen.add(name)
            model = self.model(name)
            if model is None:
                continue
            chain.append(model)
            queue.extend(model.fallbacks)
        return chain


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_portfolio(text: str, source: str = "<portfolio>") -> Portfolio:
    try:
        raw: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PortfolioError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise PortfolioError(f"{source}: expected a mapping with 'providers' and 'models'")
    try:
        return Portfolio.model_validate(raw)
    except ValidationError as exc:
        raise PortfolioError(f"{source}: {_format_validation(exc)}") from exc


def load_portfolio(path: Path) -> Portfolio:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PortfolioError(f"{path}: cannot read portfolio ({exc.strerror})") from exc
    return parse_portfolio(text, str(path))


class PortfolioStore:
    """Holds the current portfolio; `watch()` reloads it when the file changes.

    An invalid edit is logged and ignored: the last good portfolio stays in force.
    """

    def __init__(self, path: Path, on_change: Callable[[Portfolio], None] | None = None) -> None:
        self.path = Path(path)
        self._digest = ""
        self._on_change = on_change
        self.last_error: str | None = None
        self.current = self._read()

    def _read(self) -> Portfolio:
        data = self.path.read_bytes() if self.path.exists() else b""
        portfolio = load_portfolio(self.path)
        self._digest = hashlib.sha256(data).hexdigest()
        return portfolio

    def reload_if_changed(self) -> bool:
        try:
            digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError as exc:
            self.last_error = f"{self.path}: {exc.strerror}"
            log.warning("router.portfolio_unreadable", path=str(self.path), error=self.last_error)
            return False
        if digest == self._digest:
            return False
        try:
            portfolio = load_portfolio(self.path)
        except PortfolioError as exc:
            self.last_error = str(exc)
            self._digest = digest
            log.error("router.portfolio_invalid", path=str(self.path), error=str(exc))
            return False
        self._digest = digest
        self.current = portfolio
        self.last_error = None
        log.info("router.portfolio_reloaded", path=str(self.path), models=len(portfolio.models))
        if self._on_change is not None:
            self._on_change(portfolio)
        return True

    async def watch(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await asyncio.to_thread(self.reload_if_changed)
