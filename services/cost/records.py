"""Ledger records and their construction from usage events.

A ledger record is one priced model call. It is keyed by ``event_id`` (exactly
once per event) and by ``request_key`` (``<request_id>/<model>``, or the event
id when the request id is empty) so the router's and the inference service's
events about the same model call are charged once. Whichever arrives first is
recorded; the router's event is authoritative for who is charged (tenant,
application, user), so when it arrives second the row takes its attribution
(``CostStore.record_batch`` moves the budget spend with it).

``RecordUsage`` records carry client-chosen ids: their ledger keys live in the
tenant's own namespace (``api_ledger_keys``), so they never meet another tenant's
ids nor the platform's event ids.

Bounds (documented in the protos): ids ``MAX_ID_LEN``, labels ``MAX_LABEL_LEN``,
token counts ``MAX_TOKENS``, timestamps within ``[MIN_TIME_US, MAX_TIME_US)``.
Event latencies outside ``(0, MAX_LATENCY_MS]`` (NaN, infinite) count as missing.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from llmo.core.limits import MAX_ID_LEN, MAX_LABEL_LEN
from llmo.cost.prices import NoPriceAtTimeError, PriceCatalog, UnknownModelError
from llmo.protos.events.v1 import events_pb2

# Per record: far above any model call, low enough that no cost or ledger sum overflows int64.
MAX_TOKENS = 1_000_000_000
# Latencies above a day are not latencies.
MAX_LATENCY_MS = 86_400_000.0
# Usage and report times: [2000-01-01, 2100-01-01) UTC.
MIN_TIME_US = 946_684_800_000_000
MAX_TIME_US = 4_102_444_800_000_000
# Separates a tenant from its ids in ledger keys: identifiers never contain it.
_SCOPE_SEP = "|"


class Source(enum.StrEnum):
    INFERENCE = "inference"
    ROUTER = "router"
    API = "api"


_SOURCE_VALUES = {source: source.value for source in Source}  # Enum.value is a slow property on the hot path
_INFERENCE = Source.INFERENCE.value


class RejectReason(enum.StrEnum):
    MALFORMED = "malformed_payload"
    UNKNOWN_MODEL = "unknown_model"
    NO_PRICE = "no_price_at_time"


class RecordRejected(ValueError):
    def __init__(self, reason: RejectReason, detail: str, field_name: str = "") -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.field = field_name


@functools.lru_cache(maxsize=4096)
def _labels_of_hour(hour_index: int) -> tuple[str, str]:
    ts = datetime.fromtimestamp(hour_index * 3600, tz=UTC)
    return ts.strftime("%Y-%m-%d"), ts.strftime("%Y-%m-%dT%H")


def hour_labels(occurred_at_us: int) -> tuple[str, str]:
    """("YYYY-MM-DD", "YYYY-MM-DDTHH") of a UTC timestamp, the day/hour report groups."""
    return _labels_of_hour(occurred_at_us // 3_600_000_000)


@dataclass(slots=True)
class LedgerRecord:
    event_id: str
    request_key: str
    request_id: str
    source: str
    occurred_at_us: int
    tenant: str
    application: str
    user: str
    model: str
    provider: str
    prompt_version: str
    route_reason: str
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_micros: int
    ttft_ms: float | None
    latency_ms: float | None

    @property
    def occurred_at(self) -> datetime:
        return datetime.fromtimestamp(self.occurred_at_us / 1_000_000, tz=UTC)

    def attribution(self) -> tuple[str, str, str]:
        """(tenant, application, user): who the call is charged to."""
        return self.tenant, self.application, self.user

    def params(self) -> tuple[object, ...]:
        """Column values in ``usage_ledger`` column order."""
        day, hour = hour_labels(self.occurred_at_us)
        return (
            self.event_id,
            self.request_key,
            self.request_id,
            self.source,
            self.occurred_at_us,
            day,
            hour,
            self.tenant,
            self.application,
            self.user,
            self.model,
            self.provider,
            self.prompt_version,
            self.route_reason,
            self.input_tokens,
            self.cached_input_tokens,
            self.output_tokens,
            self.cost_micros,
            self.ttft_ms,
            self.latency_ms,
        )

    def row(self) -> dict[str, object]:
        day, hour = hour_labels(self.occurred_at_us)
        return {
            "event_id": self.event_id,
            "request_key": self.request_key,
            "request_id": self.request_id,
            "source": self.source,
            "occurred_at_us": self.occurred_at_us,
            "day": day,
            "hour": hour,
            "tenant": self.tenant,
            "application": self.application,
            "user_id": self.user,
            "model": self.model,
            "provider": self.provider,
            "prompt_version": self.prompt_version,
            "route_reason": self.route_reason,
            "input_tokens": self.input_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "output_tokens": self.output_tokens,
            "cost_micros": self.cost_micros,
            "ttft_ms": self.ttft_ms,
            "latency_ms": self.latency_ms,
        }


@dataclass(slots=True)
class UsageInput:
    """The fields every usage source provides, before pricing."""

    event_id: str
    request_id: str
    source: Source
    occurred_at_us: int
    tenant: str
    application: str
    user: str
    model: str
    provider: str
    prompt_version: str
    route_reason: str
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    ttft_ms: float | None
    latency_ms: float | None
    free: bool = False
    # The base model a LoRA adapter `model` runs on: its price prices the adapter's tokens when the
    # catalog has no entry of the adapter's own.
    base_model: str = ""


def price_usage(usage: UsageInput, catalog: PriceCatalog) -> LedgerRecord:
    """Validate one usage and price it with the version in force at its timestamp."""
    return _priced(
        catalog,
        usage.event_id,
        usage.request_id,
        _SOURCE_VALUES[usage.source],
        usage.occurred_at_us,
        usage.tenant,
        usage.application,
        usage.user,
        usage.model,
        usage.provider,
        usage.prompt_version,
        usage.route_reason,
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.output_tokens,
        usage.ttft_ms,
        usage.latency_ms,
        usage.free,
        usage.base_model,
    )


def _priced(
    catalog: PriceCatalog,
    event_id: str,
    request_id: str,
    source: str,
    occurred_at_us: int,
    tenant: str,
    application: str,
    user: str,
    model: str,
    provider: str,
    prompt_version: str,
    route_reason: str,
    input_tokens: int,
    cached_input_tokens: int,
    output_tokens: int,
    ttft_ms: float | None,
    latency_ms: float | None,
    free: bool,
    base_model: str = "",
) -> LedgerRecord:
    # positional and flat on purpose: the event consumers call this tens of thousands of times a second
    if not event_id:
        raise RecordRejected(RejectReason.MALFORMED, "event_id is required", "event_id")
    if not model:
        raise RecordRejected(RejectReason.MALFORMED, "model is required", "model")
    if len(event_id) > MAX_ID_LEN or len(request_id) > MAX_ID_LEN:
        raise RecordRejected(RejectReason.MALFORMED, f"event_id and request_id are limited to {MAX_ID_LEN} characters", "event_id")
    if max(len(tenant), len(application), len(user), len(model), len(provider), len(prompt_version), len(route_reason)) > MAX_LABEL_LEN:
        raise RecordRejected(RejectReason.MALFORMED, f"attribution labels are limited to {MAX_LABEL_LEN} characters", "attribution")
    if not MIN_TIME_US <= occurred_at_us < MAX_TIME_US:
        raise RecordRejected(RejectReason.MALFORMED, "occurred_at is required, within [2000-01-01, 2100-01-01)", "occurred_at")
    if not (0 <= input_tokens <= MAX_TOKENS and 0 <= cached_input_tokens <= MAX_TOKENS and 0 <= output_tokens <= MAX_TOKENS):
        raise RecordRejected(RejectReason.MALFORMED, f"token counts must be within [0, {MAX_TOKENS}]", "usage")
    if free:
        cost = 0
    else:
        try:
            version = catalog.lookup_us(model if not base_model or catalog.knows(model) else base_model, occurred_at_us)
        except UnknownModelError as exc:
            raise RecordRejected(RejectReason.UNKNOWN_MODEL, str(exc), "model") from exc
        except NoPriceAtTimeError as exc:
            raise RecordRejected(RejectReason.NO_PRICE, str(exc), "occurred_at") from exc
        cost = version.cost_micros(input_tokens, output_tokens, cached_input_tokens)
        provider = provider or version.provider
    return LedgerRecord(
        event_id,
        f"{request_id}/{model}" if request_id else event_id,
        request_id,
        source,
        occurred_at_us,
        tenant,
        application,
        user,
        model,
        provider,
        prompt_version,
        route_reason,
        input_tokens,
        cached_input_tokens,
        output_tokens,
        cost,
        ttft_ms,
        latency_ms,
    )


def price_inference_event(event: events_pb2.InferenceCompleted, catalog: PriceCatalog) -> LedgerRecord:
    """``price_usage(usage_from_inference(event))`` without the intermediate object."""
    return _priced(catalog, *_inference_fields(event, _INFERENCE), False, event.base_model)


def price_router_event(event: events_pb2.RouterCompleted, catalog: PriceCatalog) -> LedgerRecord:
    """``price_usage(usage_from_router(event))`` without the intermediate object."""
    return price_usage(usage_from_router(event), catalog)


def _latency(event: events_pb2.InferenceCompleted | events_pb2.RouterCompleted) -> tuple[float | None, float | None]:
    latency = event.latency  # an unset message reads as zeros: no HasField round trip on the hot path
    ttft, e2e = latency.ttft_ms, latency.e2e_ms
    # chained comparisons are False for NaN: out of range reads as missing
    return (ttft if 0 < ttft <= MAX_LATENCY_MS else None), (e2e if 0 < e2e <= MAX_LATENCY_MS else None)


def api_ledger_keys(tenant: str, event_id: str, request_id: str, model: str) -> tuple[str, str]:
    """(event key, request key) of a ``RecordUsage`` record, in its tenant's namespace.

    The ids are the client's own: scoped by tenant, tenantB reusing tenantA's id
    (or a platform request id it saw) records its own usage and blocks nothing.
    """
    scope = f"api{_SCOPE_SEP}{tenant}{_SCOPE_SEP}"
    return scope + event_id, scope + (f"{request_id}/{model}" if request_id else event_id)


def usage_from_inference(event: events_pb2.InferenceCompleted) -> UsageInput:
    return UsageInput(*_inference_fields(event, Source.INFERENCE), base_model=event.base_model)


# UsageInput's fields in order, without `free` (an inference event is never free).
_UsageFields = tuple[
    str, str, Any, int, str, str, str, str, str, str, str, int, int, int, float | None, float | None
]


def _inference_fields(event: events_pb2.InferenceCompleted, source: Any) -> _UsageFields:
    """One inference event's usage fields, shared by the object and the fast pricing path."""
    ttft, e2e = _latency(event)
    who = event.attribution
    usage = event.usage
    return (
        event.event_id,
        event.request_id,
        source,
        _timestamp_us(event),
        who.tenant,
        who.application,
        who.user,
        event.model,
        event.provider,
        "",
        "",
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.output_tokens,
        ttft,
        e2e,
    )


def usage_from_router(event: events_pb2.RouterCompleted) -> UsageInput:
    """A router completion; a cache hit made no model call and costs nothing."""
    ttft, e2e = _latency(event)
    who = event.attribution
    usage = event.usage
    return UsageInput(
        event.event_id,
        event.request_id,
        Source.ROUTER,
        _timestamp_us(event),
        who.tenant,
        who.application,
        who.user,
        event.model,
        event.provider,
        event.prompt_version,
        event.route_reason,
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.output_tokens,
        ttft,
        e2e,
        event.cache_hit,
        event.base_model,
    )


def _timestamp_us(event: events_pb2.InferenceCompleted | events_pb2.RouterCompleted) -> int:
    stamp = event.occurred_at  # unset reads as 0 seconds, which validation rejects
    return stamp.seconds * 1_000_000 + stamp.nanos // 1000
