"""Price catalog: list prices with effective dates, and self-hosted prices from compute.

A model has a history of price versions; the version in force at a usage
record's timestamp prices that record, so adding a new version never changes
the cost of anything already recorded (the ledger also stores the cost it
computed). Self-hosted models are priced from GPU $/hour, GPU count and measured
tokens/s: ``price_per_mtok = hourly * gpus * 1e6 / (tokens_per_s * utilisation * 3600)``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from llmo.cost.money import token_cost_micros, usd_to_micros

DEFAULT_CATALOG = "prices.yaml"


class PriceError(ValueError):
    """A catalog file or entry is invalid."""


class UnknownModelError(LookupError):
    """No price is known for the model."""

    def __init__(self, model: str) -> None:
        super().__init__(f"no price for model {model!r}")
        self.model = model


class NoPriceAtTimeError(LookupError):
    """The model has prices, but none effective at the requested time."""

    def __init__(self, model: str, at: datetime) -> None:
        super().__init__(f"model {model!r} has no price effective at {at.isoformat()}")
        self.model = model
        self.at = at


@dataclass(frozen=True)
class SelfHostedSpec:
    gpu_type: str
    gpu_hourly_micros: int
    gpu_count: int
    output_tokens_per_s: Decimal
    input_tokens_per_s: Decimal
    utilisation: Decimal

    def price_per_mtok(self, tokens_per_s: Decimal) -> int:
        hourly = Decimal(self.gpu_hourly_micros * self.gpu_count)
        per_mtok = hourly * Decimal(1_000_000) / (tokens_per_s * self.utilisation * Decimal(3600))
        return int(per_mtok.quantize(Decimal(1), rounding=ROUND_HALF_UP))


@dataclass(frozen=True)
class PriceVersion:
    """Prices in micro-dollars per million tokens, in force from ``effective_from``."""

    model: str
    provider: str
    effective_from: datetime
    input_per_mtok: int
    cached_input_per_mtok: int
    output_per_mtok: int
    self_hosted: SelfHostedSpec | None = None

    def cost_micros(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> int:
        return token_cost_micros(
            input_tokens,
            output_tokens,
            self.input_per_mtok,
            self.output_per_mtok,
            cached_input_tokens,
            self.cached_input_per_mtok,
        )


@dataclass
class _ModelHistory:
    provider: str
    versions: list[PriceVersion] = field(default_factory=list)
    starts_us: list[int] = field(default_factory=list)

    def add(self, version: PriceVersion) -> None:
        start = _to_us(version.effective_from)
        idx = bisect.bisect_left(self.starts_us, start)
        if idx < len(self.versions) and self.starts_us[idx] == start:
            self.versions[idx] = version
        else:
            self.versions.insert(idx, version)
            self.starts_us.insert(idx, start)

    def at_us(self, when_us: int) -> PriceVersion | None:
        idx = bisect.bisect_right(self.starts_us, when_us) - 1
        return self.versions[idx] if idx >= 0 else None


class PriceCatalog:
    """Model name (or alias) -> price history."""

    def __init__(self) -> None:
        self._models: dict[str, _ModelHistory] = {}
        self._aliases: dict[str, str] = {}

    def add(self, version: PriceVersion, replace_history: bool = False) -> None:
        history = self._models.get(version.model)
        if history is None or replace_history:
            history = _ModelHistory(provider=version.provider)
            self._models[version.model] = history
        history.provider = version.provider
        history.add(version)

    def add_alias(self, alias: str, model: str) -> None:
        self._aliases[alias] = model

    def canonical(self, model: str) -> str:
        return self._aliases.get(model, model)

    def knows(self, model: str) -> bool:
        return self.canonical(model) in self._models

    def lookup(self, model: str, at: datetime) -> PriceVersion:
        return self.lookup_us(model, _to_us(_utc(at)))

    def lookup_us(self, model: str, at_us: int) -> PriceVersion:
        """The version in force at ``at_us`` (microseconds since the epoch, UTC)."""
        history = self._models.get(self._aliases.get(model, model))
        if history is None:
            raise UnknownModelError(model)
        version = history.at_us(at_us)
        if version is None:
            raise NoPriceAtTimeError(model, datetime.fromtimestamp(at_us / 1_000_000, tz=UTC))
        return version

    def models(self) -> list[str]:
        return sorted(self._models)

    def versions(self, model: str | None = None) -> list[PriceVersion]:
        names = [self.canonical(model)] if model else self.models()
        out: list[PriceVersion] = []
        for name in names:
            history = self._models.get(name)
            if history is None:
                raise UnknownModelError(model or name)
            out.extend(history.versions)
        return out

    def merge_document(self, doc: Mapping[str, Any], source: str = "<memory>") -> None:
        """Add every entry of a parsed catalog document (see prices.yaml for the format)."""
        entries = doc.get("models")
        if not isinstance(entries, list):
            raise PriceError(f"{source}: expected a top-level 'models' list")
        for i, entry in enumerate(entries):
            where = f"{source}: models[{i}]"
            if not isinstance(entry, Mapping):
                raise PriceError(f"{where}: expected a mapping")
            versions = list(_parse_entry(entry, where))
            replace = bool(entry.get("replace_history", False))
            for n, version in enumerate(versions):
                self.add(version, replace_history=replace and n == 0)
            for alias in entry.get("aliases", []) or []:
                self.add_alias(str(alias), versions[0].model)

    def load_file(self, path: str | Path) -> None:
        text = Path(path).read_text(encoding="utf-8")
        doc = yaml.safe_load(text)
        if not isinstance(doc, Mapping):
            raise PriceError(f"{path}: expected a YAML mapping")
        self.merge_document(doc, source=str(path))


def load_catalog(overrides: Iterable[str | Path] = ()) -> PriceCatalog:
    """The shipped catalog, then each override file merged on top (later wins)."""
    catalog = PriceCatalog()
    shipped = resources.files("llmo.cost").joinpath(DEFAULT_CATALOG).read_text(encoding="utf-8")
    catalog.merge_document(yaml.safe_load(shipped), source=DEFAULT_CATALOG)
    for path in overrides:
        catalog.load_file(path)
    return catalog


def _to_us(value: datetime) -> int:
    return int(value.timestamp()) * 1_000_000 + value.microsecond


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _parse_date(value: Any, where: str) -> datetime:
    if isinstance(value, datetime):
        return _utc(value)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str):
        try:
            return _utc(datetime.fromisoformat(value))
        except ValueError as exc:
            raise PriceError(f"{where}: bad effective_from {value!r}") from exc
    raise PriceError(f"{where}: effective_from must be a date")


def _money(entry: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int:
    if key not in entry:
        if default is None:
            raise PriceError(f"{where}: missing {key}")
        return default
    raw = entry[key]
    if isinstance(raw, float):
        raw = str(raw)  # YAML turns 2.50 into a float; its shortest repr is the decimal the user wrote
    try:
        micros = usd_to_micros(raw)
    except (TypeError, ValueError) as exc:
        raise PriceError(f"{where}: {key}: {exc}") from exc
    if micros < 0:
        raise PriceError(f"{where}: {key} must not be negative")
    return micros


def _positive_decimal(entry: Mapping[str, Any], key: str, where: str, default: str | None = None) -> Decimal:
    raw = entry.get(key, default)
    if raw is None:
        raise PriceError(f"{where}: missing {key}")
    try:
        value = Decimal(str(raw))
    except ArithmeticError as exc:
        raise PriceError(f"{where}: {key} is not a number") from exc
    if not value.is_finite() or value <= 0:
        raise PriceError(f"{where}: {key} must be positive")
    return value


def _parse_entry(entry: Mapping[str, Any], where: str) -> Iterable[PriceVersion]:
    model = entry.get("model")
    provider = entry.get("provider")
    if not isinstance(model, str) or not model:
        raise PriceError(f"{where}: missing model")
    if not isinstance(provider, str) or not provider:
        raise PriceError(f"{where}: missing provider")
    list_prices = entry.get("prices") or []
    hosted = entry.get("self_hosted") or []
    if not list_prices and not hosted:
        raise PriceError(f"{where}: needs 'prices' or 'self_hosted'")
    for j, p in enumerate(list_prices):
        w = f"{where}.prices[{j}]"
        input_price = _money(p, "input_per_mtok_usd", w)
        yield PriceVersion(
            model=model,
            provider=provider,
            effective_from=_parse_date(p.get("effective_from"), w),
            input_per_mtok=input_price,
            cached_input_per_mtok=_money(p, "cached_input_per_mtok_usd", w, default=input_price),
            output_per_mtok=_money(p, "output_per_mtok_usd", w),
        )
    for j, h in enumerate(hosted):
        yield self_hosted_version(model, provider, h, f"{where}.self_hosted[{j}]")


def self_hosted_version(model: str, provider: str, spec: Mapping[str, Any], where: str = "self_hosted") -> PriceVersion:
    """Price version for a model served on our own GPUs."""
    count = spec.get("gpu_count", 1)
    if not isinstance(count, int) or count < 1:
        raise PriceError(f"{where}: gpu_count must be a positive integer")
    out_tps = _positive_decimal(spec, "output_tokens_per_s", where)
    hosted = SelfHostedSpec(
        gpu_type=str(spec.get("gpu_type", "")),
        gpu_hourly_micros=_money(spec, "gpu_hourly_usd", where),
        gpu_count=count,
        output_tokens_per_s=out_tps,
        input_tokens_per_s=_positive_decimal(spec, "input_tokens_per_s", where, default=str(out_tps)),
        utilisation=_positive_decimal(spec, "utilisation", where, default="1"),
    )
    if hosted.utilisation > 1:
        raise PriceError(f"{where}: utilisation must be in (0, 1]")
    input_price = hosted.price_per_mtok(hosted.input_tokens_per_s)
    return PriceVersion(
        model=model,
        provider=provider,
        effective_from=_parse_date(spec.get("effective_from"), where),
        input_per_mtok=input_price,
        cached_input_per_mtok=input_price,
        output_per_mtok=hosted.price_per_mtok(hosted.output_tokens_per_s),
        self_hosted=hosted,
    )
