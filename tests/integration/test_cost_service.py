"""The cost service over real gRPC and a real nats-server, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2
from prometheus_client import REGISTRY

from llmo.core.errors import error_info
from llmo.core.events import EventBus
from llmo.core.natsd import NatsServer
from llmo.cost.main import RunningCost, start
from llmo.cost.settings import CostSettings
from llmo.protos.common.v1 import common_pb2
from llmo.protos.cost.v1 import cost_service_pb2 as pb
from llmo.protos.cost.v1 import cost_service_pb2_grpc as pb_grpc
from llmo.protos.events.v1 import events_pb2

USD = "USD"


@dataclass
class Harness:
    running: RunningCost
    stub: pb_grpc.CostServiceStub
    bus: EventBus


@pytest.fixture
async def svc(database_url: str, nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Harness]:
    settings = CostSettings(
        database_url=database_url,
        metrics_port=-1,
        ingest_batch=50,
        ack_wait_s=5,
        budget_refresh_s=0.2,
        alert_retry_s=0.5,
        platform={"nats_url": nats_server.url, "data_dir": tmp_path, "drain_seconds": 0.5},
    )
    running = await start(settings, port=0, metrics=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    bus = await EventBus(nats_server.url).connect()
    try:
        yield Harness(running, pb_grpc.CostServiceStub(channel), bus)
    finally:
        await bus.close()
        await channel.close()
        await running.stop()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def ts(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value.replace(tzinfo=None))
    return stamp


def usd(micros: int) -> common_pb2.Money:
    return common_pb2.Money(currency_code=USD, micros=micros)


def usage_record(
    event_id: str,
    model: str = "gpt-4o-mini",
    inp: int = 1000,
    out: int = 500,
    *,
    tenant: str = "acme",
    app: str = "chat",
    ttft: float = 100.0,
    e2e: float = 300.0,
    request_id: str = "",
    at: datetime | None = None,
) -> pb.UsageRecord:
    rec = pb.UsageRecord(
        event_id=event_id,
        model=model,
        attribution=common_pb2.Attribution(tenant=tenant, application=app),
        usage=common_pb2.Usage(input_tokens=inp, output_tokens=out),
        latency=common_pb2.Latency(ttft_ms=ttft, e2e_ms=e2e),
        request_id=request_id,
    )
    if at is not None:
        rec.occurred_at.CopyFrom(ts(at))
    return rec


async def expect_error(call: Awaitable[object], code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code
    detail = error_info(info.value)
    assert detail is not None and detail.reason == reason and detail.domain == "llmo.cost"


async def test_record_usage_is_idempotent_and_reports_kpis(svc: Harness) -> None:
    stub = svc.stub
    records = [usage_record(f"u{i}", model="gpt-4o" if i < 2 else "gpt-4o-mini", ttft=10.0 * (i + 1)) for i in range(5)]
    first = await stub.RecordUsage(pb.RecordUsageRequest(records=records))
    assert [r.duplicate for r in first.results] == [False] * 5
    # gpt-4o: (1000 * 2.50 + 500 * 10.00) / 1e6 dollars = 7500 micros; gpt-4o-mini: 450 micros
    assert [r.cost.micros for r in first.results] == [7500, 7500, 450, 450, 450]
    again = await stub.RecordUsage(pb.RecordUsageRequest(records=records[:2]))
    assert [r.duplicate for r in again.results] == [True, True]

    page1 = await stub.GetCostReport(pb.GetCostReportRequest(group_by=[pb.COST_DIMENSION_MODEL], page_size=1))
    assert [k.value for k in page1.rows[0].keys] == ["gpt-4o"]
    row = page1.rows[0]
    assert (row.requests, row.cost.micros, row.cost_per_request.micros, row.cost_per_1k_requests.micros) == (2, 15000, 7500, 7_500_000)
    assert row.tokens_per_dollar == pytest.approx(3000 * 1_000_000 / 15000)
    assert (row.ttft_p50_ms, row.ttft_p95_ms) == (10.0, 20.0)
    assert page1.total.cost.micros == 15000 + 3 * 450 and page1.total.requests == 5
    page2 = await stub.GetCostReport(
        pb.GetCostReportRequest(group_by=[pb.COST_DIMENSION_MODEL], page_size=1, page_token=page1.next_page_token)
    )
    assert [k.value for k in page2.rows[0].keys] == ["gpt-4o-mini"] and not page2.next_page_token
    assert page2.rows[0].latency_p50_ms == 300.0

    await expect_error(
        stub.GetCostReport(pb.GetCostReportRequest(group_by=[pb.COST_DIMENSION_TENANT], page_token=page1.next_page_token)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
    await expect_error(
        stub.GetCostReport(pb.GetCostReportRequest(group_by=[pb.COST_DIMENSION_UNSPECIFIED])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_GROUP_BY",
    )
    now = datetime.now(UTC)
    await expect_error(
        stub.GetCostReport(pb.GetCostReportRequest(start_time=ts(now), end_time=ts(now - timedelta(hours=1)))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TIME_RANGE",
    )
    await expect_error(
        stub.RecordUsage(pb.RecordUsageRequest(records=[usage_record("x", model="no-such-model")])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_MODEL",
    )
    await expect_error(
        stub.RecordUsage(pb.RecordUsageRequest(records=[usage_record("", model="gpt-4o")])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_USAGE",
    )
    await expect_error(stub.RecordUsage(pb.RecordUsageRequest()), grpc.StatusCode.INVALID_ARGUMENT, "NO_RECORDS")
    # a rejected call records nothing
    assert svc.running.engine.store.ledger_totals() == (5, 15000 + 3 * 450)


async def test_a_report_grouped_by_request_id_shows_what_each_call_cost(svc: Harness) -> None:
    stub = svc.stub
    records = [usage_record("r-a", request_id="req-a"), usage_record("r-b", model="gpt-4o", request_id="req-b")]
    await stub.RecordUsage(pb.RecordUsageRequest(records=records))
    report = await stub.GetCostReport(pb.GetCostReportRequest(group_by=[pb.COST_DIMENSION_REQUEST_ID]))
    by_request = {row.keys[0].value: (row.requests, row.cost.micros) for row in report.rows}
    assert by_request == {"req-a": (1, 450), "req-b": (1, 7500)}


async def test_reservations_use_the_catalog_price_when_the_callers_estimate_is_lower(svc: Harness) -> None:
    """Regression (trust probe #1): the router estimated with its own portfolio prices, half the
    ledger's, so a tenant overran its hard limit by several requests."""
    stub = svc.stub
    budget = pb.Budget(tenant="acme", window=pb.BUDGET_WINDOW_DAILY, hard_limit=usd(1_000_000))
    await stub.CreateBudget(pb.CreateBudgetRequest(budget_id="acme-res", budget=budget))
    usage = common_pb2.Usage(input_tokens=1000, output_tokens=500)  # 450 micros on gpt-4o-mini
    # `reserved` in each answer is what earlier reservations hold
    await stub.CheckBudget(pb.CheckBudgetRequest(tenant="acme", model="gpt-4o-mini", estimated_cost=usd(1),
                                                 request_id="res-1", estimated_usage=usage))
    after_low = await stub.CheckBudget(pb.CheckBudgetRequest(tenant="acme", model="gpt-4o-mini", estimated_cost=usd(900),
                                                             request_id="res-2", estimated_usage=usage))
    assert after_low.reserved.micros == 450  # the catalog's price, not the caller's 1
    after_high = await stub.CheckBudget(pb.CheckBudgetRequest(tenant="acme", model="no-such-model", estimated_cost=usd(5),
                                                              request_id="res-3", estimated_usage=usage))
    assert after_high.reserved.micros == 450 + 900  # the caller's higher estimate stands
    after_unpriced = await stub.CheckBudget(pb.CheckBudgetRequest(tenant="acme", model="gpt-4o-mini", dry_run=True,
                                                                  estimated_cost=usd(1)))
    assert after_unpriced.reserved.micros == 450 + 900 + 5  # a model the catalog lacks: the caller's estimate
    await expect_error(
        stub.CheckBudget(pb.CheckBudgetRequest(tenant="acme", model="gpt-4o-mini", estimated_cost=usd(1),
                                               estimated_usage=common_pb2.Usage(input_tokens=-1))),
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ESTIMATE",
    )


async def test_budgets_allow_downgrade_deny_and_alert_once_per_threshold(svc: Harness) -> None:
    stub = svc.stub
    await svc.bus.ensure_stream("cost")
    alerts = await svc.bus.js.pull_subscribe("llmo.cost.v1.budget_threshold_crossed", durable="test-alerts", stream="LLMO_COST")
    budget = pb.Budget(
        tenant="acme", window=pb.BUDGET_WINDOW_DAILY, soft_limit=usd(3000), hard_limit=usd(4500), downgrade_model="gpt-4o-mini"
    )
    created = await stub.CreateBudget(pb.CreateBudgetRequest(budget_id="acme-daily", budget=budget))
    assert created.budget.name == "budgets/acme-daily"
    await expect_error(stub.CreateBudget(pb.CreateBudgetRequest(budget_id="acme-daily", budget=budget)), grpc.StatusCode.ALREADY_EXISTS, "BUDGET_EXISTS")
    bad = pb.Budget(tenant="acme", window=pb.BUDGET_WINDOW_DAILY, soft_limit=usd(9), hard_limit=usd(1))
    await expect_error(stub.CreateBudget(pb.CreateBudgetRequest(budget_id="bad", budget=bad)), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BUDGET")

    check = pb.CheckBudgetRequest(tenant="acme", application="chat", model="gpt-4o", estimated_cost=usd(450), dry_run=True)
    assert (await stub.CheckBudget(check)).decision == pb.BUDGET_DECISION_ALLOW
    decisions = []
    for i in range(10):  # 450 micros each
        await stub.RecordUsage(pb.RecordUsageRequest(records=[usage_record(f"b{i}")]))
        decisions.append((await stub.CheckBudget(check)).decision)
    assert decisions[:5] == [pb.BUDGET_DECISION_ALLOW] * 5
    assert pb.BUDGET_DECISION_DOWNGRADE in decisions
    assert decisions[-1] == pb.BUDGET_DECISION_DENY
    denied = await stub.CheckBudget(check)
    assert (denied.reason, denied.budget, denied.spent.micros, denied.remaining.micros) == ("hard_limit_reached", "budgets/acme-daily", 4500, 0)
    other_tenant = await stub.CheckBudget(pb.CheckBudgetRequest(tenant="globex", model="gpt-4o", estimated_cost=usd(1)))
    assert (other_tenant.decision, other_tenant.reason) == (pb.BUDGET_DECISION_ALLOW, "no_budget")
    await expect_error(
        stub.CheckBudget(pb.CheckBudgetRequest(tenant="acme", estimated_cost=usd(-1))), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ESTIMATE"
    )

    status = await stub.GetBudget(pb.GetBudgetRequest(name="budgets/acme-daily"))
    assert list(status.status.thresholds_fired) == [50, 80, 100] and status.status.spent.micros == 4500

    async def three_alerts() -> bool:
        try:
            msgs = await alerts.fetch(10, timeout=0.2)
        except Exception:
            return len(received) >= 3
        for msg in msgs:
            received.append(events_pb2.BudgetThresholdCrossed.FromString(msg.data))
            await msg.ack()
        return len(received) >= 3

    received: list[events_pb2.BudgetThresholdCrossed] = []
    await eventually(three_alerts)
    # the outbox retries publishing; JetStream drops a re-publish of the same deterministic id
    await svc.running.engine.publish_alerts(await asyncio.to_thread(svc.running.engine.store.alerts, "acme-daily"))
    await svc.running.engine.publish_pending_alerts()
    await three_alerts()
    assert sorted(a.threshold_percent for a in received) == [50, 80, 100]
    assert {a.event_id for a in received} == {f"budget-threshold:acme/acme-daily:{a.window_start.seconds}:{a.threshold_percent}" for a in received}
    assert all(a.hard and a.limit.micros == 4500 and a.budget == "budgets/acme-daily" for a in received)

    listed = await stub.ListBudgets(pb.ListBudgetsRequest(tenant="acme", page_size=10))
    assert [b.name for b in listed.budgets] == ["budgets/acme-daily"]
    await stub.DeleteBudget(pb.DeleteBudgetRequest(name="budgets/acme-daily"))
    await expect_error(stub.GetBudget(pb.GetBudgetRequest(name="budgets/acme-daily")), grpc.StatusCode.NOT_FOUND, "BUDGET_NOT_FOUND")
    await expect_error(stub.GetBudget(pb.GetBudgetRequest(name="acme-daily")), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BUDGET_NAME")
    assert (await stub.CheckBudget(check)).decision == pb.BUDGET_DECISION_ALLOW


async def test_reservations_bound_concurrent_overshoot_to_one_request(svc: Harness) -> None:
    stub = svc.stub
    budget = pb.Budget(tenant="acme", window=pb.BUDGET_WINDOW_MONTHLY, hard_limit=usd(1000))
    await stub.CreateBudget(pb.CreateBudgetRequest(budget_id="tight", budget=budget))
    checks = [
        stub.CheckBudget(pb.CheckBudgetRequest(tenant="acme", model="gpt-4o", estimated_cost=usd(300), request_id=f"req-{i}"))
        for i in range(20)
    ]
    results = await asyncio.gather(*checks)
    admitted = [r for r in results if r.decision != pb.BUDGET_DECISION_DENY]
    assert len(admitted) == 4
    released = await stub.ReleaseReservation(pb.ReleaseReservationRequest(reservation_id=admitted[0].reservation_id))
    assert released.released
    # recording the usage of a reserved request settles its reservation
    rec = usage_record("settle", model="gpt-4o", inp=40_000, out=20_000, request_id=admitted[1].reservation_id)
    await stub.RecordUsage(pb.RecordUsageRequest(records=[rec]))
    status = await stub.GetBudget(pb.GetBudgetRequest(name="budgets/tight"))
    assert status.status.spent.micros == 300_000 and status.status.reserved.micros == 600


async def test_events_are_ingested_and_bad_events_dead_lettered(svc: Harness) -> None:
    store = svc.running.engine.store
    await svc.bus.ensure_dlq()
    dlq = await svc.bus.js.pull_subscribe("llmo.dlq.inference", durable="test-dlq", stream="LLMO_DLQ")
    rejected_before = REGISTRY.get_sample_value("llmo_cost_usage_rejected_total", {"reason": "unknown_model"}) or 0.0
    now = ts(datetime.now(UTC))
    attribution = common_pb2.Attribution(tenant="acme", application="chat", user="u7")
    good = events_pb2.InferenceCompleted(
        event_id="inf-1", request_id="req-1", occurred_at=now, attribution=attribution, model="gpt-4o", provider="openai",
        usage=common_pb2.Usage(input_tokens=2000, output_tokens=1000, cached_input_tokens=1000),
        latency=common_pb2.Latency(ttft_ms=120, e2e_ms=900),
    )
    unknown = events_pb2.InferenceCompleted(event_id="inf-bad", occurred_at=now, attribution=attribution, model="mystery-model")
    await svc.bus.publish(good)
    await svc.bus.publish(unknown)
    await svc.bus.js.publish(
        "llmo.inference.v1.completed", b"\xff\xff not protobuf", headers={"Nats-Msg-Id": "junk-1", "llmo-type": "llmo.events.v1.InferenceCompleted"}
    )
    after = events_pb2.InferenceCompleted(
        event_id="inf-2", occurred_at=now, attribution=attribution, model="llmo-demo", usage=common_pb2.Usage(input_tokens=10, output_tokens=10)
    )
    await svc.bus.publish(after)

    async def inference_recorded() -> bool:
        return await asyncio.to_thread(store.get_record, "inf-1") is not None

    # The inference and router consumers commit concurrently: whichever event of a model
    # call lands first keeps the row (test_cost_storage covers both orders). This test is
    # about the router's event enriching a recorded call, so it waits for that call first.
    await eventually(inference_recorded)
    routed = events_pb2.RouterCompleted(
        event_id="rt-1", request_id="req-1", occurred_at=now, attribution=attribution, model="gpt-4o", route_reason="quality-floor",
        prompt_version="support@3", usage=common_pb2.Usage(input_tokens=2000, output_tokens=1000, cached_input_tokens=1000),
    )
    cached = events_pb2.RouterCompleted(event_id="rt-2", request_id="req-2", occurred_at=now, attribution=attribution, model="gpt-4o", cache_hit=True,
                                        usage=common_pb2.Usage(input_tokens=50, output_tokens=70))
    await svc.bus.publish(routed)
    await svc.bus.publish(cached)

    async def ingested() -> bool:
        count, _ = await asyncio.to_thread(store.ledger_totals)
        row = await asyncio.to_thread(store.get_record, "inf-1")
        return count == 3 and row is not None and row["route_reason"] == "quality-floor"

    await eventually(ingested)
    inf = store.get_record("inf-1")
    assert inf is not None
    # 2000 * 2.50 + 1000 cached * 1.25 + 1000 * 10.00 = 16250 micros
    assert (inf["cost_micros"], inf["prompt_version"], inf["user_id"], inf["ttft_ms"]) == (16250, "support@3", "u7", 120.0)
    assert store.get_record("rt-2")["cost_micros"] == 0  # type: ignore[index]
    # self-hosted price of llmo-demo: L4 $0.80/h at 50% of 15000 / 1500 tok/s -> 29630 / 296296 micros per 1M
    assert store.get_record("inf-2")["cost_micros"] == round((10 * 29630 + 10 * 296296) / 1e6)  # type: ignore[index]

    letters: list[events_pb2.DeadLetter] = []

    async def two_letters() -> bool:
        try:
            for msg in await dlq.fetch(10, timeout=0.2):
                letters.append(events_pb2.DeadLetter.FromString(msg.data))
                await msg.ack()
        except Exception:
            pass
        return len(letters) >= 2

    await eventually(two_letters)
    assert sorted((letter.reason, letter.event_id) for letter in letters) == [("malformed_payload", "junk-1"), ("unknown_model", "inf-bad")]
    assert next(letter for letter in letters if letter.reason == "unknown_model").detail == "no price for model 'mystery-model'"
    rejected_after = REGISTRY.get_sample_value("llmo_cost_usage_rejected_total", {"reason": "unknown_model"})
    assert rejected_after == rejected_before + 1


async def test_tco_forecast_and_prices(svc: Harness) -> None:
    stub = svc.stub
    tco = await stub.ComputeTco(
        pb.ComputeTcoRequest(
            tokens_per_month=160_000_000,
            input_fraction=0.75,
            api_input_per_mtok=usd(250_000),
            api_output_per_mtok=usd(2_000_000),
            gpu_type="A100-80GB",
            gpu_count=1,
            gpu_hourly=usd(1_190_000),
            hours_per_month=729.6,
            throughput_tokens_per_s=2500,
            facility_overhead_fraction=0.15,
        )
    )
    assert tco.api_monthly.micros == 110_000_000
    assert tco.break_even_tokens_per_month == 1_452_301_964
    assert tco.cheaper == pb.TCO_OPTION_API and len(tco.sensitivity) == 12 and len(tco.projection) == 36
    from_catalog = await stub.ComputeTco(
        pb.ComputeTcoRequest(tokens_per_day=50_000_000, input_fraction=0.5, api_model="gpt-4o", gpu_hourly=usd(2_000_000), throughput_tokens_per_s=1000)
    )
    assert from_catalog.blended_api_per_mtok.micros == 6_250_000
    await expect_error(
        stub.ComputeTco(pb.ComputeTcoRequest(tokens_per_day=1, api_model="gpt-4o", gpu_hourly=usd(1), throughput_tokens_per_s=1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TCO_INPUT",
    )
    await expect_error(
        stub.ComputeTco(pb.ComputeTcoRequest(tokens_per_day=1, input_fraction=0.5, api_model="gpt-4o", gpu_hourly=usd(1))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TCO_INPUT",
    )

    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    history = [usage_record(f"f{d}", model="gpt-4o", inp=1000 * (d + 1), out=0, at=today - timedelta(days=14 - d)) for d in range(14)]
    await stub.RecordUsage(pb.RecordUsageRequest(records=history))
    fc = await stub.Forecast(pb.ForecastRequest(tenant="acme", history_days=14, horizon_days=7))
    assert len(fc.points) == 7 and fc.points[0].day == today.strftime("%Y-%m-%d")
    assert fc.trend_per_day.micros == 2500
    assert fc.history_total.micros == sum(2500 * (d + 1) for d in range(14))
    assert fc.points[0].expected.micros == 2500 * 15
    await expect_error(stub.Forecast(pb.ForecastRequest(horizon_days=1000)), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FORECAST")

    o3 = await stub.ListPrices(pb.ListPricesRequest(model="o3"))
    assert [p.output_per_mtok.micros for p in o3.prices] == [40_000_000, 8_000_000]
    at = await stub.ListPrices(pb.ListPricesRequest(model="o3", at_time=ts(datetime(2025, 5, 1))))
    assert [p.output_per_mtok.micros for p in at.prices] == [40_000_000]
    first = await stub.ListPrices(pb.ListPricesRequest(page_size=3))
    second = await stub.ListPrices(pb.ListPricesRequest(page_size=3, page_token=first.next_page_token))
    assert len(first.prices) == 3 and first.prices[0].model != second.prices[0].model
    demo = await stub.ListPrices(pb.ListPricesRequest(model="llmo-demo"))
    assert demo.prices[0].self_hosted.gpu_type == "L4"
    await expect_error(stub.ListPrices(pb.ListPricesRequest(model="nope")), grpc.StatusCode.NOT_FOUND, "UNKNOWN_MODEL")
