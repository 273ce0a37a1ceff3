"""`llmo cost ...`: reports, prices and TCO from a running cost service over gRPC."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
from google.protobuf import timestamp_pb2
from rich.console import Console
from rich.table import Table

from llmo.cli import service_client
from llmo.cli.service_client import call_service
from llmo.cost.money import format_usd, usd_to_micros
from llmo.protos.common.v1 import common_pb2
from llmo.protos.cost.v1 import cost_service_pb2 as pb
from llmo.protos.cost.v1 import cost_service_pb2_grpc as pb_grpc

T = TypeVar("T")
DIMENSION_NAMES = ("tenant", "application", "user", "model", "provider", "prompt_version", "route_reason", "day", "hour", "request_id")
REPORT_COLUMNS = (
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "cost_usd",
    "tokens_per_dollar",
    "cost_per_request_usd",
    "cost_per_1k_requests_usd",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "latency_p50_ms",
    "latency_p95_ms",
)
out = Console()


def _usd(micros: int) -> str:
    """Exact decimal dollars for files (no float rounding)."""
    sign = "-" if micros < 0 else ""
    return f"{sign}{abs(micros) // 1_000_000}.{abs(micros) % 1_000_000:06d}"


def _duration(value: str) -> timedelta:
    match = re.fullmatch(r"(\d+)([hdw])", value.strip())
    if not match:
        raise click.BadParameter(f"{value!r} is not a duration like 12h, 7d or 2w")
    amount, unit = int(match.group(1)), match.group(2)
    return {"h": timedelta(hours=amount), "d": timedelta(days=amount), "w": timedelta(weeks=amount)}[unit]


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value.astimezone(UTC).replace(tzinfo=None))
    return stamp


def _call(endpoint: str, api_key: str | None, action: Callable[[pb_grpc.CostServiceStub, list[tuple[str, str]]], Awaitable[T]]) -> T:
    return call_service("cost", endpoint, api_key, pb_grpc.CostServiceStub, action)


def _emit(path: str, text: str) -> None:
    if path == "-":
        click.echo(text, nl=False)
    else:
        Path(path).write_text(text, encoding="utf-8")
        click.echo(f"wrote {path}", err=True)


def report_records(response_rows: list[pb.CostReportRow], group_by: list[str]) -> list[dict[str, Any]]:
    records = []
    for row in response_rows:
        keys = {pb.CostDimension.Name(k.dimension).removeprefix("COST_DIMENSION_").lower(): k.value for k in row.keys}
        record: dict[str, Any] = {name: keys.get(name, "") for name in group_by}
        record.update(
            requests=row.requests,
            input_tokens=row.input_tokens,
            cached_input_tokens=row.cached_input_tokens,
            output_tokens=row.output_tokens,
            cost_usd=_usd(row.cost.micros),
            tokens_per_dollar=round(row.tokens_per_dollar, 1),
            cost_per_request_usd=_usd(row.cost_per_request.micros),
            cost_per_1k_requests_usd=_usd(row.cost_per_1k_requests.micros),
            ttft_p50_ms=row.ttft_p50_ms,
            ttft_p95_ms=row.ttft_p95_ms,
            latency_p50_ms=row.latency_p50_ms,
            latency_p95_ms=row.latency_p95_ms,
        )
        records.append(record)
    return records


def default_endpoint() -> str:
    """The cost service of the stack `llmo up` runs in the data directory, else the default port."""
    return service_client.default_endpoint("cost")


@click.group()
@click.option(
    "--endpoint",
    envvar="LLMO_COST_ENDPOINT",
    default=None,
    help="Cost service host:port [default: the running `llmo up` stack's, else 127.0.0.1:50056].",
)
@click.option("--api-key", envvar="LLMO_API_KEY", default=None, help="API key (Bearer) when the service requires one.")
@click.pass_context
def cli(ctx: click.Context, endpoint: str | None, api_key: str | None) -> None:
    """Spend reports, prices and TCO from the cost service."""
    ctx.obj = {"endpoint": endpoint or default_endpoint(), "api_key": api_key}


@cli.command()
@click.option("--since", default="7d", show_default=True, help="How far back: 12h, 7d, 2w.")
@click.option("--group-by", "group_by", default="model", show_default=True, help=f"Comma-separated: {', '.join(DIMENSION_NAMES)}.")
@click.option(
    "--tenant",
    default="",
    help="Only this tenant. With API keys on, a key sees only its own tenant unless its tenant is in LLMO_ADMIN_TENANTS.",
)
@click.option("--application", default="")
@click.option("--model", default="")
@click.option("--provider", default="")
@click.option("--limit", default=1000, show_default=True, help="At most this many rows.")
@click.option("--csv", "csv_path", default=None, help="Also write CSV to this file ('-' for stdout, no table).")
@click.option("--json", "json_path", default=None, help="Also write JSON to this file ('-' for stdout, no table).")
@click.pass_obj
def report(
    obj: dict[str, Any],
    since: str,
    group_by: str,
    tenant: str,
    application: str,
    model: str,
    provider: str,
    limit: int,
    csv_path: str | None,
    json_path: str | None,
) -> None:
    """Spend, tokens per dollar and latency percentiles, grouped."""
    names = [g.strip() for g in group_by.split(",") if g.strip()]
    for name in names:
        if name not in DIMENSION_NAMES:
            raise click.BadParameter(f"unknown dimension {name!r}; choose from {', '.join(DIMENSION_NAMES)}", param_hint="--group-by")
    end = datetime.now(UTC)
    start = end - _duration(since)
    request = pb.GetCostReportRequest(
        start_time=_timestamp(start),
        end_time=_timestamp(end),
        group_by=[pb.CostDimension.Value(f"COST_DIMENSION_{n.upper()}") for n in names],
        tenant=tenant,
        application=application,
        model=model,
        provider=provider,
        page_size=min(limit, 1000),
    )

    async def fetch(stub: pb_grpc.CostServiceStub, metadata: list[tuple[str, str]]) -> tuple[list[pb.CostReportRow], pb.CostReportRow]:
        rows: list[pb.CostReportRow] = []
        total = pb.CostReportRow()
        while True:
            response = await stub.GetCostReport(request, metadata=metadata, timeout=30)
            rows.extend(response.rows)
            total = response.total
            if not response.next_page_token or len(rows) >= limit:
                return rows[:limit], total
            request.page_token = response.next_page_token

    rows, total = _call(obj["endpoint"], obj["api_key"], fetch)
    records = report_records(rows, names)
    if csv_path:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[*names, *REPORT_COLUMNS], lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        _emit(csv_path, buffer.getvalue())
    if json_path:
        document = {
            "start": start.isoformat(),
            "end": end.isoformat(),
            "group_by": names,
            "rows": records,
            "total": report_records([total], [])[0],
        }
        _emit(json_path, json.dumps(document, indent=2) + "\n")
    if "-" in (csv_path, json_path):
        return
    table = Table(title=f"LLM spend, last {since} (UTC {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M})")
    for name in names:
        table.add_column(name)
    for column, justify in (("requests", "right"), ("tokens in/out", "right"), ("cost", "right"), ("tokens/$", "right"), ("$/1k req", "right"), ("TTFT p50/p95 ms", "right"), ("latency p50/p95 ms", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]

    def cells(row: pb.CostReportRow) -> list[str]:
        return [
            f"{row.requests:,}",
            f"{row.input_tokens + row.cached_input_tokens:,} / {row.output_tokens:,}",
            format_usd(row.cost.micros, 4),
            f"{row.tokens_per_dollar:,.0f}",
            format_usd(row.cost_per_1k_requests.micros, 4),
            f"{row.ttft_p50_ms:,.0f} / {row.ttft_p95_ms:,.0f}",
            f"{row.latency_p50_ms:,.0f} / {row.latency_p95_ms:,.0f}",
        ]

    for row, record in zip(rows, records, strict=True):
        table.add_row(*[str(record[n]) or "(none)" for n in names], *cells(row))
    if names:
        table.add_section()
    table.add_row(*(["total"] + [""] * (len(names) - 1) if names else []), *cells(total), style="bold")
    out.print(table)


@cli.command()
@click.option("--model", default="", help="Only this model.")
@click.pass_obj
def prices(obj: dict[str, Any], model: str) -> None:
    """The price catalog (USD per 1M tokens) with effective dates."""

    async def fetch(stub: pb_grpc.CostServiceStub, metadata: list[tuple[str, str]]) -> list[pb.Price]:
        request = pb.ListPricesRequest(model=model, page_size=1000)
        found: list[pb.Price] = []
        while True:
            response = await stub.ListPrices(request, metadata=metadata, timeout=30)
            found.extend(response.prices)
            if not response.next_page_token:
                return found
            request.page_token = response.next_page_token

    table = Table(title="Prices per 1M tokens")
    for column in ("model", "provider", "effective", "input", "cached input", "output", "self-hosted compute"):
        table.add_column(column)
    for price in _call(obj["endpoint"], obj["api_key"], fetch):
        hosted = price.self_hosted
        compute = (
            f"{hosted.gpu_count}x {hosted.gpu_type} at {format_usd(hosted.gpu_hourly.micros)}/h, {hosted.output_tokens_per_s:g} tok/s, {hosted.utilisation:.0%} used"
            if price.HasField("self_hosted")
            else ""
        )
        table.add_row(
            price.model,
            price.provider,
            price.effective_time.ToDatetime().date().isoformat(),
            format_usd(price.input_per_mtok.micros, 4),
            format_usd(price.cached_input_per_mtok.micros, 4),
            format_usd(price.output_per_mtok.micros, 4),
            compute,
        )
    out.print(table)


def _money(dollars: str) -> common_pb2.Money:
    try:
        return common_pb2.Money(currency_code="USD", micros=usd_to_micros(dollars))
    except (TypeError, ValueError) as error:
        raise click.BadParameter(str(error)) from error


@cli.command()
@click.option("--tokens-per-day", type=int, default=0)
@click.option("--tokens-per-month", type=int, default=0)
@click.option("--input-fraction", type=float, required=True, help="Share of tokens that are input, 0..1.")
@click.option("--api-model", default="", help="Price the API side from the catalog.")
@click.option("--api-input", default="0", help="API $ per 1M input tokens (without --api-model).")
@click.option("--api-output", default="0", help="API $ per 1M output tokens (without --api-model).")
@click.option("--gpu-type", default="")
@click.option("--gpu-count", type=int, default=1)
@click.option("--gpu-hourly", default="0", help="$ per GPU-hour (rented).")
@click.option("--capex-per-gpu", default="0", help="$ per GPU (owned), amortised.")
@click.option("--amortisation-months", type=int, default=36)
@click.option("--hours-per-month", type=float, default=730.0)
@click.option("--uptime", type=float, default=1.0, help="Share of the month GPUs are billed.")
@click.option("--utilisation", type=float, default=1.0, help="Share of measured throughput used on average.")
@click.option("--throughput", type=float, required=True, help="Measured tokens/s of one GPU.")
@click.option("--ops-labour", default="0", help="$ per month.")
@click.option("--overhead", type=float, default=0.0, help="Facility overhead as a share of compute cost.")
@click.option("--growth", type=float, default=0.0, help="Monthly workload growth, e.g. 0.05.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def tco(obj: dict[str, Any], **o: Any) -> None:
    """API spend versus self-hosting: monthly cost, break-even, payback."""
    request = pb.ComputeTcoRequest(
        tokens_per_day=o["tokens_per_day"],
        tokens_per_month=o["tokens_per_month"],
        input_fraction=o["input_fraction"],
        api_model=o["api_model"],
        api_input_per_mtok=_money(o["api_input"]),
        api_output_per_mtok=_money(o["api_output"]),
        gpu_type=o["gpu_type"],
        gpu_count=o["gpu_count"],
        gpu_hourly=_money(o["gpu_hourly"]),
        capex_per_gpu=_money(o["capex_per_gpu"]),
        amortisation_months=o["amortisation_months"],
        hours_per_month=o["hours_per_month"],
        uptime_fraction=o["uptime"],
        utilisation=o["utilisation"],
        throughput_tokens_per_s=o["throughput"],
        ops_labour_per_month=_money(o["ops_labour"]),
        facility_overhead_fraction=o["overhead"],
        monthly_growth=o["growth"],
    )

    async def compute(stub: pb_grpc.CostServiceStub, metadata: list[tuple[str, str]]) -> pb.ComputeTcoResponse:
        return await stub.ComputeTco(request, metadata=metadata, timeout=30)

    result = _call(obj["endpoint"], obj["api_key"], compute)
    summary = {
        "api_monthly_usd": _usd(result.api_monthly.micros),
        "self_hosted_monthly_usd": _usd(result.self_hosted_monthly.micros),
        "monthly_savings_usd": _usd(result.monthly_savings.micros),
        "break_even_tokens_per_day": result.break_even_tokens_per_day,
        "break_even_tokens_per_month": result.break_even_tokens_per_month,
        "gpus_required": result.gpus_required,
        "payback_months": result.payback_months if result.HasField("payback_months") else None,
        "cheaper": pb.TcoOption.Name(result.cheaper).removeprefix("TCO_OPTION_").lower(),
    }
    if o["as_json"]:
        click.echo(json.dumps(summary, indent=2))
        return
    table = Table(title="TCO: API vs self-hosting (per month)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value))
    out.print(table)
    sens = Table(title="Sensitivity")
    for column in ("parameter", "x", "API $/month", "self-hosted $/month", "break-even tokens/day", "cheaper"):
        sens.add_column(column)
    for row in result.sensitivity:
        sens.add_row(
            row.parameter,
            f"{row.multiplier:g}",
            format_usd(row.api_monthly.micros),
            format_usd(row.self_hosted_monthly.micros),
            f"{row.break_even_tokens_per_day:,}",
            pb.TcoOption.Name(row.cheaper).removeprefix("TCO_OPTION_").lower(),
        )
    out.print(sens)
