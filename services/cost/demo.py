"""`make demo` step of the cost service: record usage, read a report, check a budget, compute TCO."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping

import grpc

from llmo.core.client import create_channel, outgoing_metadata
from llmo.cost.money import format_usd
from llmo.protos.common.v1 import common_pb2
from llmo.protos.cost.v1 import cost_service_pb2 as pb
from llmo.protos.cost.v1 import cost_service_pb2_grpc as pb_grpc

DEMO_TENANT = "demo"


def _usd(micros: int) -> common_pb2.Money:
    return common_pb2.Money(currency_code="USD", micros=micros)


async def _live_traffic(stub: pb_grpc.CostServiceStub, metadata: list[tuple[str, str]], *, wait_s: float) -> list[str]:
    """What the ledger took in from the other services' `*.completed` events
    (waiting up to `wait_s` for the consumers to catch up)."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        report = await stub.GetCostReport(
            pb.GetCostReportRequest(group_by=[pb.COST_DIMENSION_TENANT, pb.COST_DIMENSION_MODEL], page_size=50),
            metadata=metadata, timeout=10,
        )
        rows = [row for row in report.rows if row.keys[0].value != DEMO_TENANT]
        if rows or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.25)
    if not rows:
        return ["cost: no usage events from other services reached the ledger"]
    return [
        f"cost: from events, tenant {row.keys[0].value} model {row.keys[1].value}: {row.requests} requests, "
        f"{row.input_tokens}+{row.output_tokens} tokens, {format_usd(row.cost.micros, 6)}"
        for row in rows
    ]


async def run_demo(endpoints: dict[str, str], *, tenants: Mapping[str, str] | None = None, admin_key: str = "") -> list[str]:
    """With API keys on, `admin_key` (an admin tenant's) acts for the `demo` tenant and reads every tenant."""
    lines: list[str] = []
    run = uuid.uuid4().hex[:8]
    metadata = outgoing_metadata(admin_key or None)
    async with create_channel(endpoints["cost"]) as channel:
        stub = pb_grpc.CostServiceStub(channel)
        # The router and inference demos ran first; their completions reach the ledger as events.
        lines += await _live_traffic(stub, metadata, wait_s=10.0 if "inference" in endpoints else 0.0)
        calls = [("gpt-4o-mini", 1200, 300, 180.0, 900.0), ("gpt-4o", 3000, 800, 320.0, 2100.0), ("llmo-demo", 800, 200, 40.0, 350.0)]
        records = [
            pb.UsageRecord(
                event_id=f"demo-{run}-{i}",
                request_id=f"demo-{run}-req-{i}",
                attribution=common_pb2.Attribution(tenant=DEMO_TENANT, application="demo-app", user="demo-user"),
                model=model,
                usage=common_pb2.Usage(input_tokens=inp, output_tokens=out),
                latency=common_pb2.Latency(ttft_ms=ttft, e2e_ms=e2e),
                route_reason="demo",
            )
            for i, (model, inp, out, ttft, e2e) in enumerate(calls)
        ]
        recorded = await stub.RecordUsage(pb.RecordUsageRequest(records=records), metadata=metadata, timeout=10)
        for record, result in zip(records, recorded.results, strict=True):
            lines.append(f"cost: recorded {record.model} {record.usage.input_tokens}+{record.usage.output_tokens} tokens = {format_usd(result.cost.micros, 6)}")
        again = await stub.RecordUsage(pb.RecordUsageRequest(records=records[:1]), metadata=metadata, timeout=10)
        lines.append(f"cost: re-sent {records[0].event_id}: duplicate={again.results[0].duplicate} (ledger is exactly-once)")

        report = await stub.GetCostReport(
            pb.GetCostReportRequest(group_by=[pb.COST_DIMENSION_MODEL], tenant=DEMO_TENANT, page_size=10),
            metadata=metadata, timeout=10,
        )
        for row in report.rows:
            lines.append(
                f"cost: report {row.keys[0].value}: {row.requests} requests, {format_usd(row.cost.micros, 6)}, "
                f"{row.tokens_per_dollar:,.0f} tokens/$, TTFT p50 {row.ttft_p50_ms:.0f} ms"
            )
        lines.append(f"cost: tenant {DEMO_TENANT} total {format_usd(report.total.cost.micros, 6)} over {report.total.requests} requests")

        budget = pb.Budget(tenant=DEMO_TENANT, window=pb.BUDGET_WINDOW_DAILY, soft_limit=_usd(20_000), hard_limit=_usd(50_000), downgrade_model="gpt-4o-mini")
        try:
            await stub.CreateBudget(pb.CreateBudgetRequest(budget_id="demo-daily", budget=budget), metadata=metadata, timeout=10)
            lines.append("cost: created budget budgets/demo-daily (soft $0.02, hard $0.05 per day)")
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            lines.append("cost: budget budgets/demo-daily already exists")
        check = await stub.CheckBudget(
            pb.CheckBudgetRequest(tenant=DEMO_TENANT, application="demo-app", model="gpt-4o", estimated_cost=_usd(10_000), dry_run=True),
            metadata=metadata, timeout=5,
        )
        lines.append(
            f"cost: CheckBudget gpt-4o for {DEMO_TENANT}: {pb.BudgetDecision.Name(check.decision).removeprefix('BUDGET_DECISION_')} "
            f"({check.reason}; spent {format_usd(check.spent.micros, 6)} of {format_usd(check.limit.micros, 2)})"
            + (f" -> use {check.downgrade_model}" if check.downgrade_model else "")
        )

        tco = await stub.ComputeTco(
            pb.ComputeTcoRequest(
                tokens_per_month=160_000_000,
                input_fraction=0.75,
                api_input_per_mtok=_usd(250_000),
                api_output_per_mtok=_usd(2_000_000),
                gpu_type="A100-80GB",
                gpu_hourly=_usd(1_190_000),
                hours_per_month=729.6,
                throughput_tokens_per_s=2500,
                facility_overhead_fraction=0.15,
            ),
            metadata=metadata, timeout=10,
        )
        lines.append(
            f"cost: TCO 160M tokens/month: API {format_usd(tco.api_monthly.micros)} vs self-hosted {format_usd(tco.self_hosted_monthly.micros)}/month; "
            f"break-even {tco.break_even_tokens_per_month / 1e9:.2f}B tokens/month"
        )
    return lines
