"""Bad input to the cost service over real gRPC: every case is INVALID_ARGUMENT (never
INTERNAL) with an ErrorInfo whose message and metadata stay small whatever the input's size,
and the service keeps serving and recording afterwards."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from llmo.core.errors import error_info
from llmo.core.natsd import NatsServer
from llmo.protos.common.v1 import common_pb2
from llmo.protos.cost.v1 import cost_service_pb2 as pb
from llmo.protos.cost.v1 import cost_service_pb2_grpc as pb_grpc

from .test_cost_service import usage_record, usd
from .test_cost_tenancy import KEYS, A, _serve

BIG = "x" * 3_000_000


@pytest.fixture
async def stub(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[pb_grpc.CostServiceStub]:
    async for s in _serve(nats_server, tmp_path, api_keys=KEYS, admin_tenants="finops"):
        yield s


async def invalid(call: Awaitable[object], reason: str) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    error = raised.value
    info = error_info(error)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()[:200]
    assert info is not None and info.reason == reason and info.domain == "llmo.cost"
    assert len(error.details()) < 400 and all(len(v) < 200 for v in info.metadata.values())
    return dict(info.metadata)


def record_with(**usage: int) -> pb.UsageRecord:
    rec = usage_record("big-tokens", tenant="")
    rec.usage.CopyFrom(common_pb2.Usage(**usage))
    return rec


async def test_unbounded_ids_are_rejected_without_being_echoed(stub: pb_grpc.CostServiceStub) -> None:
    budget = pb.Budget(window=pb.BUDGET_WINDOW_DAILY, hard_limit=usd(100))
    meta = await invalid(stub.CreateBudget(pb.CreateBudgetRequest(budget_id="b" * 100_000, budget=budget), metadata=A), "INVALID_BUDGET")
    assert meta["field"] == "budget_id"
    await invalid(stub.GetBudget(pb.GetBudgetRequest(name="budgets/" + BIG), metadata=A), "INVALID_BUDGET_NAME")
    await invalid(stub.DeleteBudget(pb.DeleteBudgetRequest(name="budgets/" + BIG), metadata=A), "INVALID_BUDGET_NAME")
    meta = await invalid(stub.RecordUsage(pb.RecordUsageRequest(records=[usage_record(BIG, tenant="")]), metadata=A), "INVALID_USAGE")
    assert meta["field"] == "records[0].event_id" and meta["max_length"] == "128"
    await invalid(stub.RecordUsage(pb.RecordUsageRequest(records=[usage_record("e", tenant=BIG)]), metadata=A), "INVALID_USAGE")
    await invalid(stub.RecordUsage(pb.RecordUsageRequest(records=[usage_record("e", tenant="", app=BIG)]), metadata=A), "INVALID_USAGE")
    # a non-admin naming a huge tenant is refused for the size, not quoted back in TENANT_FORBIDDEN
    await invalid(stub.ListBudgets(pb.ListBudgetsRequest(tenant=BIG), metadata=A), "INVALID_IDENTIFIER")
    await invalid(stub.GetCostReport(pb.GetCostReportRequest(tenant=BIG), metadata=A), "INVALID_IDENTIFIER")
    await invalid(stub.CheckBudget(pb.CheckBudgetRequest(tenant=BIG, model="gpt-4o"), metadata=A), "INVALID_IDENTIFIER")
    await invalid(stub.CheckBudget(pb.CheckBudgetRequest(model="gpt-4o", request_id=BIG), metadata=A), "INVALID_IDENTIFIER")
    await invalid(stub.ListPrices(pb.ListPricesRequest(model=BIG), metadata=A), "FIELD_TOO_LONG")
    await invalid(stub.ReleaseReservation(pb.ReleaseReservationRequest(reservation_id=BIG), metadata=A), "INVALID_RESERVATION")
    await invalid(stub.GetCostReport(pb.GetCostReportRequest(page_token=BIG), metadata=A), "INVALID_PAGE_TOKEN")
    await invalid(stub.Forecast(pb.ForecastRequest(model=BIG), metadata=A), "FIELD_TOO_LONG")


async def test_out_of_range_numbers_and_times_are_invalid_argument(stub: pb_grpc.CostServiceStub) -> None:
    for usage in ({"input_tokens": 2**62}, {"output_tokens": 2**63 - 1}, {"cached_input_tokens": 1_000_000_001}):
        meta = await invalid(stub.RecordUsage(pb.RecordUsageRequest(records=[record_with(**usage)]), metadata=A), "INVALID_USAGE")
        assert meta["field"] == "usage"
    old = pb.GetCostReportRequest()
    old.start_time.seconds = -10**12
    await invalid(stub.GetCostReport(old, metadata=A), "INVALID_TIME_RANGE")
    far = pb.ForecastRequest()
    far.end_time.FromDatetime(datetime(9999, 12, 31))
    assert (await invalid(stub.Forecast(far, metadata=A), "INVALID_TIME_RANGE"))["field"] == "end_time"
    at = pb.ListPricesRequest()
    at.at_time.seconds = 10**12
    await invalid(stub.ListPrices(at, metadata=A), "INVALID_TIME_RANGE")
    late = usage_record("late", tenant="")
    late.occurred_at.seconds = 10**11
    await invalid(stub.RecordUsage(pb.RecordUsageRequest(records=[late]), metadata=A), "INVALID_USAGE")
    custom = pb.Budget(window=pb.BUDGET_WINDOW_CUSTOM, hard_limit=usd(100))
    custom.custom_start_time.seconds = -10**12
    custom.custom_end_time.seconds = 10**12
    await invalid(stub.CreateBudget(pb.CreateBudgetRequest(budget_id="c", budget=custom), metadata=A), "INVALID_BUDGET")
    tco = pb.ComputeTcoRequest(tokens_per_day=2**62, input_fraction=0.5, api_model="gpt-4o", throughput_tokens_per_s=1e-9, gpu_hourly=usd(1))
    await invalid(stub.ComputeTco(tco, metadata=A), "INVALID_TCO_INPUT")


async def test_non_finite_latency_is_refused_and_reports_stay_finite(stub: pb_grpc.CostServiceStub) -> None:
    for bad in (math.nan, math.inf, -1.0):
        rec = usage_record("lat", tenant="", e2e=bad)
        meta = await invalid(stub.RecordUsage(pb.RecordUsageRequest(records=[rec]), metadata=A), "INVALID_USAGE")
        assert meta["field"] == "records[0].latency.e2e_ms"
    await stub.RecordUsage(pb.RecordUsageRequest(records=[usage_record("ok", tenant="", e2e=250.0)]), metadata=A)
    report = await stub.GetCostReport(pb.GetCostReportRequest(), metadata=A)
    assert report.total.requests == 1 and report.total.latency_p50_ms == 250.0


async def test_duplicate_flags_within_one_call(stub: pb_grpc.CostServiceStub) -> None:
    records = [usage_record("same", tenant="") for _ in range(5)] + [usage_record("other", tenant="")]
    response = await stub.RecordUsage(pb.RecordUsageRequest(records=records), metadata=A)
    assert [r.duplicate for r in response.results] == [False, True, True, True, True, False]
    assert [r.event_id for r in response.results] == ["same"] * 5 + ["other"]
    again = await stub.RecordUsage(pb.RecordUsageRequest(records=records[:2]), metadata=A)
    assert [r.duplicate for r in again.results] == [True, True]
    report = await stub.GetCostReport(pb.GetCostReportRequest(end_time=None), metadata=A)
    assert report.total.requests == 2 and report.total.cost.micros == 2 * 450
    assert datetime.now(UTC).year < 2100
