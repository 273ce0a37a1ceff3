"""gRPC servicer of llmo.cost.v1.CostService."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from llmo.core import context as ctx
from llmo.core.auth import may_access, scoped_tenant
from llmo.core.errors import already_exists, failed_precondition, invalid_argument, not_found
from llmo.core.limits import MAX_LABEL_LEN, check_identifier, check_text, preview
from llmo.core.pagination import decode_page_token, encode_page_token, page_size
from llmo.cost.budgets import (
    MAX_BUDGET_ID_LEN,
    Budget,
    BudgetValidationError,
    Decision,
    Window,
    budget_key,
    is_budget_id,
    window_key,
)
from llmo.cost.engine import CostEngine
from llmo.cost.forecast import fill_days, forecast
from llmo.cost.prices import NoPriceAtTimeError, PriceVersion, UnknownModelError
from llmo.cost.records import (
    MAX_LATENCY_MS,
    MAX_TIME_US,
    MAX_TOKENS,
    MIN_TIME_US,
    LedgerRecord,
    RecordRejected,
    RejectReason,
    Source,
    UsageInput,
    api_ledger_keys,
)
from llmo.cost.reports import kpis, percentile
from llmo.cost.storage import ReportQuery, ReportRow
from llmo.cost.tco import TcoInput, TcoInputError, TcoResult, compute_tco
from llmo.protos.common.v1 import common_pb2
from llmo.protos.cost.v1 import cost_service_pb2 as pb
from llmo.protos.cost.v1 import cost_service_pb2_grpc as pb_grpc

MAX_RECORDS_PER_CALL = 1000
MAX_RANGE = timedelta(days=400)
TIME_BOUNDS = "[2000-01-01, 2100-01-01) UTC"

DIMENSIONS: dict[Any, str] = {
    pb.COST_DIMENSION_TENANT: "tenant",
    pb.COST_DIMENSION_APPLICATION: "application",
    pb.COST_DIMENSION_USER: "user",
    pb.COST_DIMENSION_MODEL: "model",
    pb.COST_DIMENSION_PROVIDER: "provider",
    pb.COST_DIMENSION_PROMPT_VERSION: "prompt_version",
    pb.COST_DIMENSION_ROUTE_REASON: "route_reason",
    pb.COST_DIMENSION_DAY: "day",
    pb.COST_DIMENSION_HOUR: "hour",
    pb.COST_DIMENSION_REQUEST_ID: "request_id",
}
DIMENSION_ENUM = {name: value for value, name in DIMENSIONS.items()}
WINDOWS = {pb.BUDGET_WINDOW_DAILY: Window.DAILY, pb.BUDGET_WINDOW_MONTHLY: Window.MONTHLY, pb.BUDGET_WINDOW_CUSTOM: Window.CUSTOM}
WINDOW_ENUM = {w: v for v, w in WINDOWS.items()}
DECISIONS = {
    Decision.ALLOW: pb.BUDGET_DECISION_ALLOW,
    Decision.DOWNGRADE: pb.BUDGET_DECISION_DOWNGRADE,
    Decision.DENY: pb.BUDGET_DECISION_DENY,
}


def money(micros: int) -> common_pb2.Money:
    return common_pb2.Money(currency_code="USD", micros=micros)


def micros_of(value: common_pb2.Money, field_name: str) -> int:
    if value.currency_code not in ("", "USD"):
        raise invalid_argument("UNSUPPORTED_CURRENCY", f"{field_name}: only USD is supported", field=field_name)
    return int(value.micros)


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value.astimezone(UTC).replace(tzinfo=None))
    return stamp


def from_timestamp(value: timestamp_pb2.Timestamp, field_name: str, reason: str = "INVALID_TIME_RANGE") -> datetime:
    """A request time, which must lie within TIME_BOUNDS (INVALID_ARGUMENT otherwise)."""
    us = value.seconds * 1_000_000 + value.nanos // 1000
    if not (MIN_TIME_US <= us < MAX_TIME_US and 0 <= value.nanos < 1_000_000_000):
        raise invalid_argument(reason, f"{field_name} must be within {TIME_BOUNDS}", field=field_name)
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC)


def label(value: str, field_name: str) -> str:
    """A model, provider, application, user or other short label: at most MAX_LABEL_LEN characters."""
    return check_text(value, field_name, max_len=MAX_LABEL_LEN)


def latency_ms(value: float, field_name: str) -> float | None:
    """A RecordUsage latency: 0 (unset) or within (0, MAX_LATENCY_MS]; NaN and infinities are refused."""
    if value == 0:
        return None
    if not 0 < value <= MAX_LATENCY_MS:
        raise invalid_argument(
            "INVALID_USAGE", f"{field_name} must be a finite number of milliseconds in (0, {MAX_LATENCY_MS:.0f}]", field=field_name
        )
    return value


def fraction(value: float, field_name: str) -> Fraction:
    if not math.isfinite(value):
        raise invalid_argument("INVALID_TCO_INPUT", f"{field_name} must be a finite number", field=field_name)
    return Fraction(repr(value))


def page_offset(token: str, query: str) -> int:
    offset = (decode_page_token(token, query=query) or {}).get("offset", 0)
    if not isinstance(offset, int) or offset < 0:
        raise invalid_argument("INVALID_PAGE_TOKEN", "page_token is malformed or belongs to another query")
    return offset


def budget_id_of(name: str) -> str:
    prefix, _, budget_id = name.partition("/")
    if prefix != "budgets" or not is_budget_id(budget_id):
        raise invalid_argument(
            "INVALID_BUDGET_NAME",
            f"budget name must be budgets/{{budget}}, the id at most {MAX_BUDGET_ID_LEN} letters, digits, '-' or '_'; "
            f"got {preview(name)!r}",
            name=preview(name),
        )
    return budget_id


def budget_proto(budget: Budget) -> pb.Budget:
    message = pb.Budget(
        name=f"budgets/{budget.budget_id}",
        display_name=budget.display_name,
        tenant=budget.tenant,
        application=budget.application,
        model=budget.model,
        window=WINDOW_ENUM[budget.window],
        soft_limit=money(budget.soft_limit_micros),
        hard_limit=money(budget.hard_limit_micros),
        downgrade_model=budget.downgrade_model,
    )
    if budget.custom_start and budget.custom_end:
        message.custom_start_time.CopyFrom(timestamp(budget.custom_start))
        message.custom_end_time.CopyFrom(timestamp(budget.custom_end))
    return message


def price_proto(version: PriceVersion) -> pb.Price:
    message = pb.Price(
        model=version.model,
        provider=version.provider,
        effective_time=timestamp(version.effective_from),
        input_per_mtok=money(version.input_per_mtok),
        cached_input_per_mtok=money(version.cached_input_per_mtok),
        output_per_mtok=money(version.output_per_mtok),
    )
    hosted = version.self_hosted
    if hosted:
        message.self_hosted.CopyFrom(
            pb.SelfHostedCompute(
                gpu_type=hosted.gpu_type,
                gpu_hourly=money(hosted.gpu_hourly_micros),
                gpu_count=hosted.gpu_count,
                output_tokens_per_s=float(hosted.output_tokens_per_s),
                input_tokens_per_s=float(hosted.input_tokens_per_s),
                utilisation=float(hosted.utilisation),
            )
        )
    return message


def report_row(row: ReportRow) -> pb.CostReportRow:
    total_tokens = row.input_tokens + row.cached_input_tokens + row.output_tokens
    figures = kpis(row.requests, total_tokens, row.cost_micros)
    return pb.CostReportRow(
        keys=[pb.DimensionValue(dimension=DIMENSION_ENUM[k], value=v) for k, v in row.keys.items()],
        requests=row.requests,
        input_tokens=row.input_tokens,
        cached_input_tokens=row.cached_input_tokens,
        output_tokens=row.output_tokens,
        cost=money(row.cost_micros),
        tokens_per_dollar=figures.tokens_per_dollar,
        cost_per_request=money(figures.cost_per_request_micros),
        cost_per_1k_requests=money(figures.cost_per_1k_requests_micros),
        ttft_p50_ms=percentile(row.ttft_ms, 50),
        ttft_p95_ms=percentile(row.ttft_ms, 95),
        latency_p50_ms=percentile(row.latency_ms, 50),
        latency_p95_ms=percentile(row.latency_ms, 95),
    )


class CostServicer(pb_grpc.CostServiceServicer):
    def __init__(self, engine: CostEngine) -> None:
        self.engine = engine

    @staticmethod
    def _tenant(requested: str, field_name: str = "tenant") -> str:
        """The tenant a write or a budget check acts on: `requested`, defaulting to the
        caller's own; another tenant's only for admins (PERMISSION_DENIED otherwise)."""
        check_identifier(requested, field_name)
        return scoped_tenant(requested or ctx.current_tenant() or "")

    @staticmethod
    def _filter_tenant(requested: str) -> str:
        """A tenant filter (empty: the caller's own, or every tenant for admins)."""
        return scoped_tenant(check_identifier(requested, "tenant"))

    async def _visible_budget(self, name: str, tenant: str) -> Budget:
        """The budget called `name` in the caller's tenant (or, for admins, in `tenant`, else
        the only one of that id). Budget ids are per tenant: another tenant's is never found."""
        budget_id = budget_id_of(name)
        store = self.engine.store
        budget: Budget | None
        if tenant or not ctx.is_admin():
            owner = self._tenant(tenant)
            budget = await asyncio.to_thread(store.get_budget, budget_key(owner, budget_id))
        else:
            candidates = await asyncio.to_thread(store.budgets_named, budget_id)
            own = [b for b in candidates if b.tenant == (ctx.current_tenant() or "")]
            if len(candidates) > 1 and not own:
                raise failed_precondition(
                    "BUDGET_NAME_AMBIGUOUS", f"{len(candidates)} tenants have budget {name!r}: set tenant", name=name
                )
            found = own or candidates
            budget = found[0] if found else None
        if budget is None or not may_access(budget.tenant):
            raise not_found("BUDGET_NOT_FOUND", f"no budget {name!r}", name=name)
        return budget

    def _usage(self, i: int, rec: pb.UsageRecord, now_us: int) -> UsageInput:
        """One RecordUsage record, its ids and labels bounded (INVALID_ARGUMENT otherwise)."""
        where, bad = f"records[{i}]", "INVALID_USAGE"
        check_identifier(rec.event_id, f"{where}.event_id", required=True, reason=bad)
        check_identifier(rec.request_id, f"{where}.request_id", reason=bad)
        check_identifier(rec.attribution.tenant, f"{where}.attribution.tenant", reason=bad)
        who = rec.attribution
        for field_name in ("model", "provider", "prompt_version", "route_reason"):
            check_text(getattr(rec, field_name), f"{where}.{field_name}", max_len=MAX_LABEL_LEN, reason=bad)
        check_text(who.application, f"{where}.attribution.application", max_len=MAX_LABEL_LEN, reason=bad)
        check_text(who.user, f"{where}.attribution.user", max_len=MAX_LABEL_LEN, reason=bad)
        occurred = rec.occurred_at.seconds * 1_000_000 + rec.occurred_at.nanos // 1000 if rec.HasField("occurred_at") else now_us
        return UsageInput(
            event_id=rec.event_id,
            request_id=rec.request_id,
            source=Source.API,
            occurred_at_us=occurred,
            tenant=self._tenant(who.tenant, f"{where}.attribution.tenant"),
            application=who.application,
            user=who.user,
            model=rec.model,
            provider=rec.provider,
            prompt_version=rec.prompt_version,
            route_reason=rec.route_reason,
            input_tokens=rec.usage.input_tokens,
            cached_input_tokens=rec.usage.cached_input_tokens,
            output_tokens=rec.usage.output_tokens,
            ttft_ms=latency_ms(rec.latency.ttft_ms, f"{where}.latency.ttft_ms"),
            latency_ms=latency_ms(rec.latency.e2e_ms, f"{where}.latency.e2e_ms"),
        )

    async def RecordUsage(self, request: pb.RecordUsageRequest, context: grpc.aio.ServicerContext) -> pb.RecordUsageResponse:
        if not request.records:
            raise invalid_argument("NO_RECORDS", "records must not be empty")
        if len(request.records) > MAX_RECORDS_PER_CALL:
            raise invalid_argument("TOO_MANY_RECORDS", f"at most {MAX_RECORDS_PER_CALL} records per call")
        now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
        records: list[LedgerRecord] = []
        for i, rec in enumerate(request.records):
            usage = self._usage(i, rec, now_us)
            try:
                record = self.engine.price(usage)
            except RecordRejected as rejected:
                reason = "UNKNOWN_MODEL" if rejected.reason is RejectReason.UNKNOWN_MODEL else "INVALID_USAGE"
                if rejected.reason is RejectReason.NO_PRICE:
                    reason = "NO_PRICE_AT_TIME"
                raise invalid_argument(
                    reason, f"records[{i}]: {rejected.detail}", index=i, field=rejected.field, event_id=rec.event_id
                ) from rejected
            record.event_id, record.request_key = api_ledger_keys(record.tenant, rec.event_id, rec.request_id, rec.model)
            records.append(record)
        outcome = await self.engine.ingest(records)
        inserted = {r.event_id for r in outcome.inserted}
        results = []
        for rec, record in zip(request.records, records, strict=True):
            # only the first copy of an event id in the call is the one that was recorded
            fresh = record.event_id in inserted
            inserted.discard(record.event_id)
            results.append(pb.RecordUsageResult(event_id=rec.event_id, cost=money(record.cost_micros), duplicate=not fresh))
        return pb.RecordUsageResponse(results=results)

    async def GetCostReport(self, request: pb.GetCostReportRequest, context: grpc.aio.ServicerContext) -> pb.GetCostReportResponse:
        filters = {k: label(getattr(request, k), k) for k in ("application", "model", "provider") if getattr(request, k)}
        tenant = self._filter_tenant(request.tenant)
        if tenant:
            filters["tenant"] = tenant
        explicit_start = from_timestamp(request.start_time, "start_time") if request.HasField("start_time") else None
        explicit_end = from_timestamp(request.end_time, "end_time") if request.HasField("end_time") else None
        # The fingerprint holds the scoped filters, so a page token only continues the query it came from.
        explicit = (
            request.start_time.ToJsonString() if explicit_start else "",
            request.end_time.ToJsonString() if explicit_end else "",
        )
        fingerprint = f"{explicit}|{list(request.group_by)}|{sorted(filters.items())}"
        page_offset(request.page_token, fingerprint)  # bounds and checks the token before it is read
        position = decode_page_token(request.page_token, query=fingerprint) or {}
        # Later pages keep the range of the first one, even where it defaulted to "now".
        end = explicit_end or datetime.now(UTC)
        if "end_us" in position:
            if not isinstance(position["end_us"], int) or not MIN_TIME_US <= position["end_us"] < MAX_TIME_US:
                raise invalid_argument("INVALID_PAGE_TOKEN", "page_token is malformed or belongs to another query")
            end = datetime.fromtimestamp(position["end_us"] / 1_000_000, tz=UTC)
        start = explicit_start or end - timedelta(days=30)
        if end <= start:
            raise invalid_argument("INVALID_TIME_RANGE", "end_time must be after start_time")
        if end - start > MAX_RANGE:
            raise invalid_argument("INVALID_TIME_RANGE", f"time range longer than {MAX_RANGE.days} days")
        group_by: list[str] = []
        for value in request.group_by:
            name = DIMENSIONS.get(value)
            if name is None:
                raise invalid_argument("INVALID_GROUP_BY", f"unknown or unspecified dimension {value}", dimension=value)
            if name in group_by:
                raise invalid_argument("INVALID_GROUP_BY", f"dimension {name} given twice", dimension=name)
            group_by.append(name)
        size = page_size(request.page_size)
        offset = page_offset(request.page_token, fingerprint)
        start_us, end_us = int(start.timestamp() * 1_000_000), int(end.timestamp() * 1_000_000)
        store = self.engine.store
        page_query = ReportQuery(start_us, end_us, tuple(group_by), filters, offset, size)
        rows, more = await asyncio.to_thread(store.report, page_query)
        totals, _ = await asyncio.to_thread(store.report, ReportQuery(start_us, end_us, (), filters, 0, 1))
        response = pb.GetCostReportResponse(rows=[report_row(r) for r in rows])
        if totals:
            response.total.CopyFrom(report_row(totals[0]))
        if more:
            response.next_page_token = encode_page_token({"offset": offset + size, "end_us": end_us}, query=fingerprint)
        return response

    async def ListPrices(self, request: pb.ListPricesRequest, context: grpc.aio.ServicerContext) -> pb.ListPricesResponse:
        catalog = self.engine.catalog
        label(request.model, "model")
        if request.model and not catalog.knows(request.model):
            raise not_found("UNKNOWN_MODEL", f"no price for model {request.model!r}", model=request.model)
        if request.HasField("at_time"):
            at = from_timestamp(request.at_time, "at_time")
            names = [catalog.canonical(request.model)] if request.model else catalog.models()
            versions = []
            for name in names:
                try:
                    versions.append(catalog.lookup(name, at))
                except LookupError:
                    continue
        else:
            versions = catalog.versions(request.model or None)
        size = page_size(request.page_size)
        fingerprint = f"{request.model}|{request.at_time.seconds if request.HasField('at_time') else ''}"
        offset = page_offset(request.page_token, fingerprint)
        page = versions[offset : offset + size]
        response = pb.ListPricesResponse(prices=[price_proto(v) for v in page])
        if offset + size < len(versions):
            response.next_page_token = encode_page_token({"offset": offset + size}, query=fingerprint)
        return response

    async def CreateBudget(self, request: pb.CreateBudgetRequest, context: grpc.aio.ServicerContext) -> pb.CreateBudgetResponse:
        spec = request.budget
        window = WINDOWS.get(spec.window)
        if window is None:
            raise invalid_argument("INVALID_BUDGET", "window must be DAILY, MONTHLY or CUSTOM", field="window")
        for field_name in ("display_name", "application", "model", "downgrade_model"):
            label(getattr(spec, field_name), field_name)
        budget = Budget(
            budget_id=request.budget_id,
            display_name=spec.display_name,
            tenant=self._tenant(spec.tenant),
            application=spec.application,
            model=spec.model,
            window=window,
            soft_limit_micros=micros_of(spec.soft_limit, "soft_limit"),
            hard_limit_micros=micros_of(spec.hard_limit, "hard_limit"),
            custom_start=from_timestamp(spec.custom_start_time, "custom_start_time", "INVALID_BUDGET")
            if spec.HasField("custom_start_time")
            else None,
            custom_end=from_timestamp(spec.custom_end_time, "custom_end_time", "INVALID_BUDGET")
            if spec.HasField("custom_end_time")
            else None,
            downgrade_model=spec.downgrade_model,
        )
        try:
            budget.validate()
        except BudgetValidationError as exc:
            raise invalid_argument("INVALID_BUDGET", str(exc), field=exc.field) from exc
        if not await self.engine.create_budget(budget):
            raise already_exists("BUDGET_EXISTS", f"budget {budget.budget_id!r} already exists", budget=budget.budget_id)
        return pb.CreateBudgetResponse(budget=budget_proto(budget))

    async def GetBudget(self, request: pb.GetBudgetRequest, context: grpc.aio.ServicerContext) -> pb.GetBudgetResponse:
        budget = await self._visible_budget(request.name, request.tenant)
        key = budget.key
        store = self.engine.store
        response = pb.GetBudgetResponse(budget=budget_proto(budget))
        window = budget.window_at(datetime.now(UTC))
        if window is None:
            response.status.active = False
            return response
        start = window_key(window[0])
        spent = await asyncio.to_thread(store.window_spend, key, start)
        fired = [a.threshold_percent for a in await asyncio.to_thread(store.alerts, key) if a.window_start == start]
        reserved = self.engine.guard.reserved(key, start)
        limit = budget.limit_micros
        response.status.CopyFrom(
            pb.BudgetStatus(
                window_start_time=timestamp(window[0]),
                window_end_time=timestamp(window[1]),
                spent=money(spent),
                reserved=money(reserved),
                remaining=money(max(0, limit - spent - reserved)),
                thresholds_fired=sorted(fired),
                active=True,
            )
        )
        return response

    async def ListBudgets(self, request: pb.ListBudgetsRequest, context: grpc.aio.ServicerContext) -> pb.ListBudgetsResponse:
        tenant = self._filter_tenant(request.tenant)
        size = page_size(request.page_size)
        offset = page_offset(request.page_token, tenant)
        budgets = await asyncio.to_thread(self.engine.store.list_budgets, tenant, offset, size + 1)
        response = pb.ListBudgetsResponse(budgets=[budget_proto(b) for b in budgets[:size]])
        if len(budgets) > size:
            response.next_page_token = encode_page_token({"offset": offset + size}, query=tenant)
        return response

    async def DeleteBudget(self, request: pb.DeleteBudgetRequest, context: grpc.aio.ServicerContext) -> pb.DeleteBudgetResponse:
        budget = await self._visible_budget(request.name, request.tenant)
        if not await self.engine.delete_budget(budget.key):
            raise not_found("BUDGET_NOT_FOUND", f"no budget {request.name!r}", name=request.name)
        return pb.DeleteBudgetResponse()

    def _catalog_estimate(self, model: str, usage: common_pb2.Usage) -> int:
        """The catalog's price of `usage` on `model` now (0 when the catalog does not price it)."""
        counts = (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens)
        if not all(0 <= n <= MAX_TOKENS for n in counts):
            raise invalid_argument("INVALID_ESTIMATE", f"estimated_usage token counts must be within [0, {MAX_TOKENS}]",
                                   field="estimated_usage")
        try:
            version = self.engine.catalog.lookup(model, datetime.now(UTC))
        except (UnknownModelError, NoPriceAtTimeError):
            return 0
        return version.cost_micros(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens)

    async def CheckBudget(self, request: pb.CheckBudgetRequest, context: grpc.aio.ServicerContext) -> pb.CheckBudgetResponse:
        estimate = micros_of(request.estimated_cost, "estimated_cost")
        if estimate < 0:
            raise invalid_argument("INVALID_ESTIMATE", "estimated_cost must not be negative", field="estimated_cost")
        label(request.application, "application")
        label(request.model, "model")
        if request.HasField("estimated_usage"):
            estimate = max(estimate, self._catalog_estimate(request.model, request.estimated_usage))
        check_identifier(request.request_id, "request_id")
        verdict = self.engine.guard.check(
            self._tenant(request.tenant),
            request.application,
            request.model,
            estimate,
            datetime.now(UTC),
            reservation_id=request.request_id,
            reserve=not request.dry_run,
        )
        return pb.CheckBudgetResponse(
            decision=DECISIONS[verdict.decision],
            reason=verdict.reason,
            budget=f"budgets/{verdict.budget_id}" if verdict.budget_id else "",
            spent=money(verdict.spent_micros),
            reserved=money(verdict.reserved_micros),
            limit=money(verdict.limit_micros),
            remaining=money(verdict.remaining_micros),
            downgrade_model=verdict.downgrade_model,
            reservation_id=verdict.reservation_id,
            matched_budgets=[f"budgets/{b}" for b in verdict.matched],
        )

    async def ReleaseReservation(
        self, request: pb.ReleaseReservationRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseReservationResponse:
        check_identifier(request.reservation_id, "reservation_id", required=True, reason="INVALID_RESERVATION")
        # a tenant gives back only its own reservations; admins (the router) any
        owner = None if ctx.is_admin() else (ctx.current_tenant() or "")
        return pb.ReleaseReservationResponse(released=self.engine.guard.release(request.reservation_id, owner))

    def _tco_input(self, request: pb.ComputeTcoRequest) -> TcoInput:
        if not request.HasField("input_fraction"):
            raise invalid_argument("INVALID_TCO_INPUT", "input_fraction is required", field="input_fraction")
        if request.tokens_per_day and request.tokens_per_month:
            raise invalid_argument("INVALID_TCO_INPUT", "give tokens_per_day or tokens_per_month, not both", field="tokens_per_day")
        label(request.api_model, "api_model")
        label(request.gpu_type, "gpu_type")
        hours = fraction(request.hours_per_month, "hours_per_month") if request.hours_per_month else Fraction(730)
        tokens_per_day = Fraction(request.tokens_per_day)
        if request.tokens_per_month:
            tokens_per_day = Fraction(request.tokens_per_month) * 24 / hours
        if request.api_model:
            try:
                version = self.engine.catalog.lookup(request.api_model, datetime.now(UTC))
            except LookupError as exc:
                raise invalid_argument("UNKNOWN_MODEL", str(exc), field="api_model") from exc
            api_in, api_out = version.input_per_mtok, version.output_per_mtok
        else:
            api_in = micros_of(request.api_input_per_mtok, "api_input_per_mtok")
            api_out = micros_of(request.api_output_per_mtok, "api_output_per_mtok")
        return TcoInput(
            tokens_per_day=tokens_per_day,
            input_fraction=fraction(request.input_fraction, "input_fraction"),
            api_input_per_mtok_micros=api_in,
            api_output_per_mtok_micros=api_out,
            throughput_tokens_per_s=fraction(request.throughput_tokens_per_s, "throughput_tokens_per_s"),
            gpu_count=request.gpu_count or 1,
            gpu_type=request.gpu_type,
            gpu_hourly_micros=micros_of(request.gpu_hourly, "gpu_hourly"),
            capex_per_gpu_micros=micros_of(request.capex_per_gpu, "capex_per_gpu"),
            amortisation_months=request.amortisation_months or 36,
            hours_per_month=hours,
            uptime_fraction=fraction(request.uptime_fraction, "uptime_fraction") if request.uptime_fraction else Fraction(1),
            utilisation=fraction(request.utilisation, "utilisation") if request.utilisation else Fraction(1),
            ops_labour_micros_per_month=micros_of(request.ops_labour_per_month, "ops_labour_per_month"),
            facility_overhead_fraction=fraction(request.facility_overhead_fraction, "facility_overhead_fraction"),
            monthly_growth=fraction(request.monthly_growth, "monthly_growth"),
            horizon_months=request.horizon_months or 36,
        )

    async def ComputeTco(self, request: pb.ComputeTcoRequest, context: grpc.aio.ServicerContext) -> pb.ComputeTcoResponse:
        inp = self._tco_input(request)
        try:
            result = compute_tco(inp)
        except TcoInputError as exc:
            raise invalid_argument("INVALID_TCO_INPUT", str(exc), field=exc.field) from exc
        try:
            return self._tco_response(result)
        except ValueError as exc:  # protobuf refuses integers past int32/int64
            raise invalid_argument("INVALID_TCO_INPUT", "the inputs give results beyond the response's integer ranges") from exc

    @staticmethod
    def _tco_response(result: TcoResult) -> pb.ComputeTcoResponse:
        option = {"api": pb.TCO_OPTION_API, "self_hosted": pb.TCO_OPTION_SELF_HOSTED}
        response = pb.ComputeTcoResponse(
            api_monthly=money(result.api_monthly_micros),
            self_hosted_monthly=money(result.self_hosted_monthly_micros),
            self_hosted_compute=money(result.self_hosted_compute_micros),
            self_hosted_overhead=money(result.self_hosted_overhead_micros),
            self_hosted_ops=money(result.self_hosted_ops_micros),
            monthly_savings=money(result.monthly_savings_micros),
            blended_api_per_mtok=money(result.blended_api_per_mtok_micros),
            self_hosted_per_mtok=money(result.self_hosted_per_mtok_micros),
            gpus_required=result.gpus_required,
            capacity_tokens_per_day=result.capacity_tokens_per_day,
            break_even_tokens_per_day=result.break_even_tokens_per_day,
            break_even_tokens_per_month=result.break_even_tokens_per_month,
            break_even_within_capacity=result.break_even_within_capacity,
            cheaper=option[result.cheaper],
            projection=[
                pb.TcoMonth(
                    month=m.month, tokens_per_day=m.tokens_per_day, api=money(m.api_micros), self_hosted=money(m.self_hosted_micros), gpus=m.gpus
                )
                for m in result.projection
            ],
            sensitivity=[
                pb.TcoSensitivityRow(
                    parameter=s.parameter,
                    multiplier=float(s.multiplier),
                    api_monthly=money(s.api_monthly_micros),
                    self_hosted_monthly=money(s.self_hosted_monthly_micros),
                    break_even_tokens_per_day=s.break_even_tokens_per_day,
                    cheaper=option[s.cheaper],
                )
                for s in result.sensitivity
            ],
        )
        if result.payback_months is not None:
            response.payback_months = result.payback_months
        return response

    async def Forecast(self, request: pb.ForecastRequest, context: grpc.aio.ServicerContext) -> pb.ForecastResponse:
        history_days = request.history_days or 30
        horizon_days = request.horizon_days or 30
        confidence = request.confidence or 0.95
        if not 1 <= history_days <= 366:
            raise invalid_argument("INVALID_FORECAST", "history_days must be within [1, 366]", field="history_days")
        if not 1 <= horizon_days <= 366:
            raise invalid_argument("INVALID_FORECAST", "horizon_days must be within [1, 366]", field="horizon_days")
        if not 0 < confidence < 1:
            raise invalid_argument("INVALID_FORECAST", "confidence must be within (0, 1)", field="confidence")
        end = from_timestamp(request.end_time, "end_time") if request.HasField("end_time") else datetime.now(UTC)
        last_day = end.date() - timedelta(days=1)
        first_day = last_day - timedelta(days=history_days - 1)
        start_dt = datetime(first_day.year, first_day.month, first_day.day, tzinfo=UTC)
        end_dt = start_dt + timedelta(days=history_days)
        filters = {k: label(getattr(request, k), k) for k in ("application", "model") if getattr(request, k)}
        tenant = self._filter_tenant(request.tenant)
        if tenant:
            filters["tenant"] = tenant
        spend = await asyncio.to_thread(
            self.engine.store.daily_spend, int(start_dt.timestamp() * 1_000_000), int(end_dt.timestamp() * 1_000_000), filters
        )
        by_day = {datetime.strptime(day, "%Y-%m-%d").date(): micros for day, micros in spend.items()}
        history = fill_days(by_day, first_day, last_day)
        result = forecast(history, horizon_days, confidence)
        return pb.ForecastResponse(
            points=[
                pb.ForecastPoint(
                    day=p.day.isoformat(), expected=money(p.expected_micros), lower=money(p.lower_micros), upper=money(p.upper_micros)
                )
                for p in result.points
            ],
            total_expected=money(result.total_expected_micros),
            total_lower=money(result.total_lower_micros),
            total_upper=money(result.total_upper_micros),
            trend_per_day=money(round(result.slope_micros_per_day)),
            history_days=result.history_days,
            history_total=money(sum(v for _, v in history)),
        )


