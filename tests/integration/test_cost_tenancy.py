"""Tenant isolation of the cost service over real gRPC: with API keys on, a tenant sees
and changes only its own costs and budgets; admin tenants act across tenants; with no
keys configured (development) every caller still sees everything."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmo.core.errors import error_info
from llmo.core.natsd import NatsServer
from llmo.cost.main import start
from llmo.cost.settings import CostSettings
from llmo.protos.cost.v1 import cost_service_pb2 as pb
from llmo.protos.cost.v1 import cost_service_pb2_grpc as pb_grpc

from .test_cost_service import ts, usage_record, usd

KEYS = {"key-a": "acme", "key-b": "globex", "key-ops": "finops"}
A = (("authorization", "Bearer key-a"),)
B = (("authorization", "Bearer key-b"),)
ADMIN = (("authorization", "Bearer key-ops"),)


async def _serve(nats_server: NatsServer, tmp_path: Path, **platform: Any) -> AsyncIterator[pb_grpc.CostServiceStub]:
    settings = CostSettings(
        database_url=f"sqlite:///{tmp_path / 'cost.db'}",
        metrics_port=-1,
        budget_refresh_s=0.2,
        platform={"nats_url": nats_server.url, "data_dir": tmp_path, "drain_seconds": 0.5, **platform},
    )
    running = await start(settings, port=0, metrics=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield pb_grpc.CostServiceStub(channel)
    finally:
        await channel.close()
        await running.stop()


@pytest.fixture
async def secured(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[pb_grpc.CostServiceStub]:
    async for stub in _serve(nats_server, tmp_path, api_keys=KEYS, admin_tenants="finops"):
        yield stub


@pytest.fixture
async def open_dev(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[pb_grpc.CostServiceStub]:
    async for stub in _serve(nats_server, tmp_path):
        yield stub


async def failure(call: Awaitable[object]) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    info = error_info(raised.value)
    assert info is not None and info.domain == "llmo.cost"
    return raised.value.code(), info.reason, dict(info.metadata)


FORBIDDEN_B = (grpc.StatusCode.PERMISSION_DENIED, "TENANT_FORBIDDEN", {"caller_tenant": "acme", "requested_tenant": "globex"})


def budget(tenant: str = "") -> pb.Budget:
    return pb.Budget(tenant=tenant, window=pb.BUDGET_WINDOW_DAILY, soft_limit=usd(3000), hard_limit=usd(4500))


def tenants_of(report: pb.GetCostReportResponse) -> list[str]:
    return [k.value for row in report.rows for k in row.keys if k.dimension == pb.COST_DIMENSION_TENANT]


BY_TENANT = pb.GetCostReportRequest(group_by=[pb.COST_DIMENSION_TENANT])


async def seed_usage(stub: pb_grpc.CostServiceStub, metadata: Any) -> None:
    # acme: 7500 + 450 micros over two models; globex: 7500 micros
    records = [
        usage_record("a1", model="gpt-4o", tenant="acme"),
        usage_record("a2", model="gpt-4o-mini", tenant="acme"),
        usage_record("g1", model="gpt-4o", tenant="globex"),
    ]
    await stub.RecordUsage(pb.RecordUsageRequest(records=records), metadata=metadata)


async def test_tenant_reads_only_its_own_costs(secured: pb_grpc.CostServiceStub) -> None:
    stub = secured
    await seed_usage(stub, ADMIN)

    admin_view = await stub.GetCostReport(BY_TENANT, metadata=ADMIN)
    assert sorted(tenants_of(admin_view)) == ["acme", "globex"] and admin_view.total.cost.micros == 7950 + 7500

    own = await stub.GetCostReport(BY_TENANT, metadata=A)
    assert tenants_of(own) == ["acme"] and own.total.cost.micros == 7950
    assert tenants_of(await stub.GetCostReport(BY_TENANT, metadata=B)) == ["globex"]
    named_own = await stub.GetCostReport(pb.GetCostReportRequest(tenant="acme"), metadata=A)
    assert named_own.total.cost.micros == 7950
    assert await failure(stub.GetCostReport(pb.GetCostReportRequest(tenant="globex"), metadata=A)) == FORBIDDEN_B

    # the admin may narrow to any one tenant
    globex = await stub.GetCostReport(pb.GetCostReportRequest(tenant="globex"), metadata=ADMIN)
    assert globex.total.cost.micros == 7500


async def test_page_tokens_stay_bound_to_the_scoped_query(secured: pb_grpc.CostServiceStub) -> None:
    stub = secured
    await seed_usage(stub, ADMIN)
    by_model = pb.GetCostReportRequest(group_by=[pb.COST_DIMENSION_MODEL], page_size=1)
    first = await stub.GetCostReport(by_model, metadata=A)
    second = pb.GetCostReportRequest(group_by=[pb.COST_DIMENSION_MODEL], page_size=1, page_token=first.next_page_token)
    rest = await stub.GetCostReport(second, metadata=A)
    assert not rest.next_page_token
    assert sum(r.cost.micros for r in [*first.rows, *rest.rows]) == 7950

    # a token the admin got for "all tenants" does not continue a tenant's (narrower) query
    everything = await stub.GetCostReport(by_model, metadata=ADMIN)
    stolen = pb.GetCostReportRequest(group_by=[pb.COST_DIMENSION_MODEL], page_size=1, page_token=everything.next_page_token)
    code, reason, _ = await failure(stub.GetCostReport(stolen, metadata=A))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


async def test_tenant_records_usage_only_for_itself(secured: pb_grpc.CostServiceStub) -> None:
    stub = secured
    foreign = pb.RecordUsageRequest(records=[usage_record("x1", tenant="globex")])
    assert await failure(stub.RecordUsage(foreign, metadata=A)) == FORBIDDEN_B
    unnamed = pb.RecordUsageRequest(records=[usage_record("x2", tenant="")])
    await stub.RecordUsage(unnamed, metadata=A)
    report = await stub.GetCostReport(BY_TENANT, metadata=ADMIN)
    assert tenants_of(report) == ["acme"] and report.total.requests == 1


async def test_forecast_is_scoped(secured: pb_grpc.CostServiceStub) -> None:
    stub = secured
    await seed_usage(stub, ADMIN)
    # history ends with today, so today's records are in it
    tomorrow = ts(datetime.now(UTC) + timedelta(days=1))
    own = await stub.Forecast(pb.ForecastRequest(history_days=3, end_time=tomorrow), metadata=A)
    assert own.history_total.micros == 7950
    everyone = await stub.Forecast(pb.ForecastRequest(history_days=3, end_time=tomorrow), metadata=ADMIN)
    assert everyone.history_total.micros == 7950 + 7500
    assert await failure(stub.Forecast(pb.ForecastRequest(tenant="globex", end_time=tomorrow), metadata=A)) == FORBIDDEN_B


async def test_budgets_are_private_to_their_tenant(secured: pb_grpc.CostServiceStub) -> None:
    stub = secured
    await stub.CreateBudget(pb.CreateBudgetRequest(budget_id="globex-daily", budget=budget("globex")), metadata=ADMIN)
    # an admin's unnamed tenant is its own too (as before: the API creates no budget over every tenant)
    ops = await stub.CreateBudget(pb.CreateBudgetRequest(budget_id="ops", budget=budget()), metadata=ADMIN)
    assert ops.budget.tenant == "finops"
    # an unnamed tenant is the caller's own
    mine = await stub.CreateBudget(pb.CreateBudgetRequest(budget_id="acme-daily", budget=budget()), metadata=A)
    assert mine.budget.tenant == "acme"
    create_foreign = stub.CreateBudget(pb.CreateBudgetRequest(budget_id="evil", budget=budget("globex")), metadata=A)
    assert await failure(create_foreign) == FORBIDDEN_B

    listed = await stub.ListBudgets(pb.ListBudgetsRequest(), metadata=A)
    assert [b.name for b in listed.budgets] == ["budgets/acme-daily"]
    assert await failure(stub.ListBudgets(pb.ListBudgetsRequest(tenant="globex"), metadata=A)) == FORBIDDEN_B
    all_budgets = await stub.ListBudgets(pb.ListBudgetsRequest(), metadata=ADMIN)
    assert sorted(b.name for b in all_budgets.budgets) == ["budgets/acme-daily", "budgets/globex-daily", "budgets/ops"]

    # another tenant's budget does not exist for a tenant
    assert (await stub.GetBudget(pb.GetBudgetRequest(name="budgets/acme-daily"), metadata=A)).budget.tenant == "acme"
    for name in ("budgets/globex-daily", "budgets/ops"):
        code, reason, _ = await failure(stub.GetBudget(pb.GetBudgetRequest(name=name), metadata=A))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "BUDGET_NOT_FOUND")
        code, reason, _ = await failure(stub.DeleteBudget(pb.DeleteBudgetRequest(name=name), metadata=A))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "BUDGET_NOT_FOUND")
    # ... and was not deleted
    assert (await stub.GetBudget(pb.GetBudgetRequest(name="budgets/globex-daily"), metadata=ADMIN)).budget.tenant == "globex"

    code, _, _ = await failure(stub.DeleteBudget(pb.DeleteBudgetRequest(name="budgets/acme-daily"), metadata=B))
    assert code == grpc.StatusCode.NOT_FOUND
    await stub.DeleteBudget(pb.DeleteBudgetRequest(name="budgets/acme-daily"), metadata=A)
    assert not (await stub.ListBudgets(pb.ListBudgetsRequest(), metadata=A)).budgets


async def test_list_budgets_page_tokens_stay_bound_to_the_scoped_query(secured: pb_grpc.CostServiceStub) -> None:
    stub = secured
    for budget_id, tenant in (("a1", "acme"), ("a2", "acme"), ("g1", "globex"), ("g2", "globex")):
        await stub.CreateBudget(pb.CreateBudgetRequest(budget_id=budget_id, budget=budget(tenant)), metadata=ADMIN)
    names = []
    token = ""
    while True:
        page = await stub.ListBudgets(pb.ListBudgetsRequest(page_size=1, page_token=token), metadata=B)
        names += [b.name for b in page.budgets]
        token = page.next_page_token
        if not token:
            break
    assert names == ["budgets/g1", "budgets/g2"]
    admin_page = await stub.ListBudgets(pb.ListBudgetsRequest(page_size=1), metadata=ADMIN)
    code, reason, _ = await failure(stub.ListBudgets(pb.ListBudgetsRequest(page_token=admin_page.next_page_token), metadata=B))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


async def test_budget_checks_for_other_tenants_need_an_admin(secured: pb_grpc.CostServiceStub) -> None:
    stub = secured
    await stub.CreateBudget(pb.CreateBudgetRequest(budget_id="globex-daily", budget=budget("globex")), metadata=ADMIN)
    check = pb.CheckBudgetRequest(tenant="globex", model="gpt-4o", estimated_cost=usd(100), dry_run=True)
    assert await failure(stub.CheckBudget(check, metadata=A)) == FORBIDDEN_B
    # the router's identity is an admin tenant: it checks budgets on behalf of end tenants
    verdict = await stub.CheckBudget(check, metadata=ADMIN)
    assert (verdict.decision, verdict.budget) == (pb.BUDGET_DECISION_ALLOW, "budgets/globex-daily")
    own = await stub.CheckBudget(pb.CheckBudgetRequest(model="gpt-4o", estimated_cost=usd(100), dry_run=True), metadata=B)
    assert own.budget == "budgets/globex-daily"
    # a tenant gives back only its own reservations; an admin any
    held = await stub.CheckBudget(pb.CheckBudgetRequest(tenant="globex", model="gpt-4o", estimated_cost=usd(100), request_id="r-9"), metadata=ADMIN)
    assert held.reservation_id == "r-9"
    release = pb.ReleaseReservationRequest(reservation_id="r-9")
    assert (await stub.ReleaseReservation(release, metadata=A)).released is False
    assert (await stub.ReleaseReservation(release, metadata=B)).released is True
    # tenant-free RPCs stay open to every tenant
    assert (await stub.ListPrices(pb.ListPricesRequest(model="gpt-4o"), metadata=A)).prices


async def test_without_api_keys_every_caller_sees_every_tenant(open_dev: pb_grpc.CostServiceStub) -> None:
    stub = open_dev
    await seed_usage(stub, None)
    assert sorted(tenants_of(await stub.GetCostReport(BY_TENANT))) == ["acme", "globex"]
    assert (await stub.GetCostReport(pb.GetCostReportRequest(tenant="globex"))).total.cost.micros == 7500
    await stub.CreateBudget(pb.CreateBudgetRequest(budget_id="g", budget=budget("globex")))
    created = await stub.CreateBudget(pb.CreateBudgetRequest(budget_id="d", budget=budget()))
    assert created.budget.tenant == "default"
    assert sorted(b.name for b in (await stub.ListBudgets(pb.ListBudgetsRequest())).budgets) == ["budgets/d", "budgets/g"]
    assert (await stub.GetBudget(pb.GetBudgetRequest(name="budgets/g"))).budget.tenant == "globex"
    check = await stub.CheckBudget(pb.CheckBudgetRequest(tenant="globex", estimated_cost=usd(1), dry_run=True))
    assert check.budget == "budgets/g"



async def test_record_usage_ids_are_scoped_by_tenant(secured: pb_grpc.CostServiceStub) -> None:
    stub = secured
    mine = usage_record("reuse-1", tenant="", request_id="req-reuse")
    first = await stub.RecordUsage(pb.RecordUsageRequest(records=[mine]), metadata=A)
    assert [r.duplicate for r in first.results] == [False]
    # globex reusing acme's event id and request id is recorded, and billed, for globex
    theirs = await stub.RecordUsage(pb.RecordUsageRequest(records=[mine]), metadata=B)
    assert [(r.event_id, r.duplicate, r.cost.micros) for r in theirs.results] == [("reuse-1", False, 450)]
    # each tenant repeating its own id is a duplicate
    for metadata in (A, B):
        again = await stub.RecordUsage(pb.RecordUsageRequest(records=[mine]), metadata=metadata)
        assert [r.duplicate for r in again.results] == [True]
    same_request = usage_record("reuse-2", tenant="", request_id="req-reuse")
    assert [r.duplicate for r in (await stub.RecordUsage(pb.RecordUsageRequest(records=[same_request]), metadata=B)).results] == [True]
    for metadata in (A, B):
        report = await stub.GetCostReport(BY_TENANT, metadata=metadata)
        assert (report.total.requests, report.total.cost.micros) == (1, 450)


async def test_budget_ids_are_per_tenant(secured: pb_grpc.CostServiceStub) -> None:
    stub = secured
    name = "budgets/a-secret"
    created_a = await stub.CreateBudget(pb.CreateBudgetRequest(budget_id="a-secret", budget=budget()), metadata=A)
    # globex gets its own "a-secret": no ALREADY_EXISTS for acme's, so nothing about it leaks
    theirs = pb.Budget(window=pb.BUDGET_WINDOW_DAILY, hard_limit=usd(450))
    created_b = await stub.CreateBudget(pb.CreateBudgetRequest(budget_id="a-secret", budget=theirs), metadata=B)
    assert (created_a.budget.name, created_a.budget.tenant) == (name, "acme")
    assert (created_b.budget.name, created_b.budget.tenant, created_b.budget.hard_limit.micros) == (name, "globex", 450)
    assert await failure(stub.CreateBudget(pb.CreateBudgetRequest(budget_id="a-secret", budget=budget()), metadata=B)) == (
        grpc.StatusCode.ALREADY_EXISTS, "BUDGET_EXISTS", {"budget": "a-secret"}
    )
    assert (await stub.GetBudget(pb.GetBudgetRequest(name=name), metadata=A)).budget.tenant == "acme"
    assert (await stub.GetBudget(pb.GetBudgetRequest(name=name), metadata=B)).budget.tenant == "globex"
    # usage moves only the tenant's own budget
    await stub.RecordUsage(pb.RecordUsageRequest(records=[usage_record("g-1", tenant="")]), metadata=B)
    status_b = await stub.GetBudget(pb.GetBudgetRequest(name=name), metadata=B)
    status_a = await stub.GetBudget(pb.GetBudgetRequest(name=name), metadata=A)
    assert (status_b.status.spent.micros, list(status_b.status.thresholds_fired)) == (450, [50, 80, 100])
    assert (status_a.status.spent.micros, list(status_a.status.thresholds_fired)) == (0, [])
    denied = await stub.CheckBudget(pb.CheckBudgetRequest(model="gpt-4o-mini", estimated_cost=usd(1)), metadata=B)
    assert (denied.decision, denied.budget) == (pb.BUDGET_DECISION_DENY, name)
    allowed = await stub.CheckBudget(pb.CheckBudgetRequest(model="gpt-4o-mini", estimated_cost=usd(1), dry_run=True), metadata=A)
    assert allowed.decision == pb.BUDGET_DECISION_ALLOW
    # a tenant naming another tenant's namespace is refused; admins name the tenant
    assert (await failure(stub.GetBudget(pb.GetBudgetRequest(name=name, tenant="globex"), metadata=A)))[:2] == (
        grpc.StatusCode.PERMISSION_DENIED, "TENANT_FORBIDDEN"
    )
    assert (await failure(stub.GetBudget(pb.GetBudgetRequest(name=name), metadata=ADMIN)))[:2] == (
        grpc.StatusCode.FAILED_PRECONDITION, "BUDGET_NAME_AMBIGUOUS"
    )
    assert (await stub.GetBudget(pb.GetBudgetRequest(name=name, tenant="globex"), metadata=ADMIN)).budget.hard_limit.micros == 450
    await stub.DeleteBudget(pb.DeleteBudgetRequest(name=name), metadata=B)
    assert (await stub.GetBudget(pb.GetBudgetRequest(name=name), metadata=ADMIN)).budget.tenant == "acme"
    assert (await failure(stub.GetBudget(pb.GetBudgetRequest(name=name), metadata=B)))[:2] == (
        grpc.StatusCode.NOT_FOUND, "BUDGET_NOT_FOUND"
    )
