"""The cost ledger's storage on SQLite and PostgreSQL (the `database_url` fixture)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from llmo.cost.budgets import Budget, Window, window_key
from llmo.cost.prices import load_catalog
from llmo.cost.records import LedgerRecord, Source, UsageInput, api_ledger_keys, price_usage
from llmo.cost.storage import _LEDGER_COLUMNS, CostStore, ReportQuery

NOW = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
CATALOG = load_catalog()


@pytest.fixture
def store(database_url: str) -> Iterator[CostStore]:
    store = CostStore.open(database_url)
    yield store
    store.close()


def record(
    event_id: str,
    *,
    tenant: str = "acme",
    app: str = "chat",
    model: str = "gpt-4o-mini",
    inp: int = 1000,
    out: int = 500,
    at: datetime = NOW,
    request_id: str = "",
    source: Source = Source.INFERENCE,
    route_reason: str = "",
    ttft: float | None = 100.0,
) -> LedgerRecord:
    usage = UsageInput(
        event_id=event_id,
        request_id=request_id,
        source=source,
        occurred_at_us=int(at.timestamp() * 1_000_000),
        tenant=tenant,
        application=app,
        user="u1",
        model=model,
        provider="",
        prompt_version="",
        route_reason=route_reason,
        input_tokens=inp,
        cached_input_tokens=0,
        output_tokens=out,
        ttft_ms=ttft,
        latency_ms=ttft * 3 if ttft else None,
    )
    return price_usage(usage, CATALOG)


def test_each_event_is_recorded_once_and_totals_are_exact(store: CostStore) -> None:
    batch = [record(f"e{i}", inp=1000 + i, out=7 * i) for i in range(300)]
    expected = sum(r.cost_micros for r in batch)
    first = store.record_batch(batch)
    assert len(first.inserted) == 300 and first.duplicates == 0
    # redelivery of half the batch, plus the same event twice in one batch
    again = store.record_batch([*batch[:150], batch[0]])
    assert again.inserted == [] and again.duplicates == 151
    assert store.ledger_totals() == (300, expected)
    # 1000 input + 500 output of gpt-4o-mini: (1000 * 150000 + 500 * 600000) / 1e6 = 450 micros
    assert record("x").cost_micros == 450
    row = record("x").row()
    assert tuple(row) == _LEDGER_COLUMNS and tuple(row.values()) == record("x").params()


def test_new_and_already_recorded_events_interleaved_across_insert_chunks(store: CostStore) -> None:
    # SQLite inserts 50 rows per statement: old and new rows alternate across those boundaries
    old = [record(f"old{i}") for i in range(0, 123, 2)]
    store.record_batch(old)
    mixed = [record(f"old{i}") if i % 2 == 0 else record(f"new{i}", inp=i) for i in range(123)]
    outcome = store.record_batch(mixed)
    assert [r.event_id for r in outcome.inserted] == [f"new{i}" for i in range(1, 123, 2)]
    assert outcome.duplicates == len(old)
    assert store.ledger_totals() == (123, sum(r.cost_micros for r in old) + sum(r.cost_micros for r in outcome.inserted))


def test_router_and_inference_events_of_one_call_are_charged_once(store: CostStore) -> None:
    inference = record("inf-1", request_id="req-1")
    router = record("rt-1", request_id="req-1", source=Source.ROUTER, route_reason="cheapest-capable")
    store.record_batch([inference])
    outcome = store.record_batch([router])
    assert outcome.inserted == [] and outcome.enriched == 1
    assert store.ledger_totals() == (1, inference.cost_micros)
    row = store.get_record("inf-1")
    assert row is not None and row["route_reason"] == "cheapest-capable"


def test_budget_spend_and_threshold_alerts_commit_with_the_batch_once_per_window(store: CostStore) -> None:
    budget = Budget("acme-daily", "acme", Window.DAILY, hard_limit_micros=4500)
    assert store.create_budget(budget, NOW) == (True, [])
    assert store.create_budget(budget, NOW)[0] is False
    key = ("acme/acme-daily", window_key(NOW.replace(hour=0, minute=0)))
    fired: list[int] = []
    for n in range(12):  # 450 micros each: 50% after 5, 80% after 8, 100% after 10
        outcome = store.record_batch([record(f"b{n}")])
        assert outcome.deltas == {key: 450}
        fired += [a.threshold_percent for a in outcome.alerts]
    assert fired == [50, 80, 100]
    assert store.window_spend(*key) == 12 * 450
    # other tenants and redeliveries never move the budget
    store.record_batch([record("other", tenant="globex"), record("b3")])
    assert store.window_spend(*key) == 12 * 450
    # the next day is a new window: its thresholds fire again
    tomorrow = NOW + timedelta(days=1)
    outcome = store.record_batch([record(f"t{n}", at=tomorrow) for n in range(6)])
    assert [a.threshold_percent for a in outcome.alerts] == [50]
    assert {a.event_id for a in store.alerts("acme/acme-daily", unpublished_only=True)} >= {
        f"budget-threshold:acme/acme-daily:{key[1]}:50"
    }
    store.mark_published([a.event_id for a in store.alerts("acme/acme-daily")])
    assert store.alerts("acme/acme-daily", unpublished_only=True) == []


def test_a_new_budget_starts_with_the_spend_already_in_its_window(store: CostStore) -> None:
    store.record_batch([record(f"p{i}", app="search") for i in range(4)] + [record("c0", app="chat")])
    created, alerts = store.create_budget(Budget("search", "acme", Window.MONTHLY, soft_limit_micros=2000, application="search"), NOW)
    assert created
    assert [a.threshold_percent for a in alerts] == [50, 80]
    start = window_key(NOW.replace(day=1, hour=0, minute=0))
    assert store.spend_snapshot([("acme/search", start)]) == {("acme/search", start): 1800}
    assert store.delete_budget("acme/search") is True
    assert store.delete_budget("acme/search") is False
    assert store.get_budget("acme/search") is None


def test_report_groups_paginates_and_collects_latencies(store: CostStore) -> None:
    rows = []
    for i in range(40):
        rows.append(record(f"r{i}", model="gpt-4o-mini" if (i // 4) % 2 else "gpt-4o", tenant=f"t{i % 4}", ttft=float(i)))
    store.record_batch(rows)
    start_us = int((NOW - timedelta(hours=1)).timestamp() * 1_000_000)
    end_us = int((NOW + timedelta(hours=1)).timestamp() * 1_000_000)
    page1, more = store.report(ReportQuery(start_us, end_us, ("tenant", "model"), {}, 0, 5))
    page2, more2 = store.report(ReportQuery(start_us, end_us, ("tenant", "model"), {}, 5, 5))
    assert more and not more2
    assert len(page1) == 5 and len(page2) == 3
    assert page2[-1].keys == {"tenant": "t3", "model": "gpt-4o-mini"}
    assert page1[0].keys == {"tenant": "t0", "model": "gpt-4o"}
    assert page1[0].requests == 5
    assert page1[0].ttft_ms == [0.0, 8.0, 16.0, 24.0, 32.0]
    by_model, _ = store.report(ReportQuery(start_us, end_us, ("model",), {"tenant": "t1"}, 0, 10))
    assert [(r.keys["model"], r.requests) for r in by_model] == [("gpt-4o", 5), ("gpt-4o-mini", 5)]
    total, _ = store.report(ReportQuery(start_us, end_us, (), {}, 0, 1))
    assert total[0].cost_micros == sum(r.cost_micros for r in rows)
    days, _ = store.report(ReportQuery(start_us, end_us, ("day", "hour"), {}, 0, 10))
    assert days[0].keys == {"day": NOW.strftime("%Y-%m-%d"), "hour": NOW.strftime("%Y-%m-%dT%H")}
    empty, _ = store.report(ReportQuery(end_us, end_us + 1, (), {}, 0, 1))
    assert empty == []


def test_daily_spend(store: CostStore) -> None:
    yesterday = NOW - timedelta(days=1)
    store.record_batch([record("a", at=yesterday), record("b"), record("c"), record("d", tenant="globex")])
    spend = store.daily_spend(
        int((NOW - timedelta(days=3)).timestamp() * 1_000_000), int((NOW + timedelta(days=1)).timestamp() * 1_000_000), {"tenant": "acme"}
    )
    assert spend == {yesterday.strftime("%Y-%m-%d"): 450, NOW.strftime("%Y-%m-%d"): 900}


def _budget_spend(store: CostStore, budget: Budget) -> int:
    window = budget.window_at(NOW)
    assert window is not None
    return store.window_spend(budget.key, window_key(window[0]))


@pytest.mark.parametrize("order", ["inference_first", "router_first", "same_batch"])
def test_the_router_event_decides_who_is_charged_whichever_arrives_first(store: CostStore, order: str) -> None:
    # the inference event carries the router's own service tenant; the router's names the end tenant
    b_budget = Budget("daily", "globex", Window.DAILY, hard_limit_micros=300)
    router_budget = Budget("daily", "router", Window.DAILY, hard_limit_micros=10_000)
    everyone = Budget("all", "", Window.DAILY, hard_limit_micros=10_000)
    for budget in (b_budget, router_budget, everyone):
        assert store.create_budget(budget, NOW)[0]
    inference = record("inf-1", request_id="req-1", tenant="router", app="", inp=800, out=300)
    routed = record("rt-1", request_id="req-1", tenant="globex", app="chat", source=Source.ROUTER, route_reason="cheapest", inp=800, out=300)
    batches = {"inference_first": [[inference], [routed]], "router_first": [[routed], [inference]], "same_batch": [[inference, routed]]}
    deltas: dict[tuple[str, int], int] = {}
    for batch in batches[order]:
        for key, delta in store.record_batch(batch).deltas.items():
            deltas[key] = deltas.get(key, 0) + delta
    # redeliveries of both events change nothing
    again = store.record_batch([inference, routed])
    assert again.inserted == [] and again.deltas == {} and again.enriched == 0
    cost = inference.cost_micros
    assert cost == 300  # 800 * $0.15 + 300 * $0.60 per 1M tokens of gpt-4o-mini
    assert store.ledger_totals() == (1, cost)
    assert store.ledger_totals("globex") == (1, cost) and store.ledger_totals("router") == (0, 0)
    rows = [r for r in (store.get_record("inf-1"), store.get_record("rt-1")) if r is not None]
    assert len(rows) == 1
    assert (rows[0]["tenant"], rows[0]["application"], rows[0]["route_reason"]) == ("globex", "chat", "cheapest")
    # the budgets read exactly what the ledger says, and the in-memory deltas agree with them
    assert (_budget_spend(store, b_budget), _budget_spend(store, router_budget), _budget_spend(store, everyone)) == (cost, 0, cost)
    assert {k: v for k, v in deltas.items() if v} == {
        (b_budget.key, window_key(NOW.replace(hour=0, minute=0))): cost,
        (everyone.key, window_key(NOW.replace(hour=0, minute=0))): cost,
    }
    # the tenant's hard limit was reached by its own call and alerted once
    assert [a.threshold_percent for a in store.alerts(b_budget.key)] == [50, 80, 100]
    assert store.alerts(router_budget.key) == []


def test_budget_ids_are_per_tenant(store: CostStore) -> None:
    mine, theirs = Budget("a-secret", "acme", Window.DAILY, hard_limit_micros=900), Budget("a-secret", "globex", Window.DAILY, hard_limit_micros=450)
    assert store.create_budget(mine, NOW)[0] and store.create_budget(theirs, NOW)[0]
    assert store.create_budget(theirs, NOW)[0] is False
    outcome = store.record_batch([record("g1", tenant="globex")])
    # alert ids name the tenant: globex's 100% alert is its own, acme's budget is untouched
    assert [a.event_id for a in outcome.alerts] == [
        f"budget-threshold:globex/a-secret:{window_key(NOW.replace(hour=0, minute=0))}:{p}" for p in (50, 80, 100)
    ]
    assert (_budget_spend(store, mine), _budget_spend(store, theirs)) == (0, 450)
    assert {b.tenant for b in store.budgets_named("a-secret")} == {"acme", "globex"}
    assert store.delete_budget(theirs.key) and store.get_budget(mine.key) == mine


def test_migration_0002_rekeys_existing_budgets_with_their_spend_and_alerts(database_url: str) -> None:
    import sqlalchemy as sa

    from llmo.core import storage as core_storage
    from llmo.cost.storage import MIGRATIONS

    engine = core_storage.create_engine(database_url)
    core_storage.migrate(engine, MIGRATIONS, "0001")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO budgets (budget_id, display_name, tenant, application, model, \"window\", soft_limit_micros,"
                " hard_limit_micros, downgrade_model, created_at_us) VALUES ('old', '', 'acme', '', '', 'daily', 0, 900, '', 1)"
            )
        )
        conn.execute(sa.text("INSERT INTO budget_spend (budget_id, window_start, spent_micros) VALUES ('old', 86400, 450)"))
        conn.execute(
            sa.text(
                "INSERT INTO budget_alerts (budget_id, window_start, threshold_percent, event_id, spent_micros, limit_micros,"
                " fired_at_us, published) VALUES ('old', 86400, 50, 'budget-threshold:old:86400:50', 450, 900, 1, true)"
            )
        )
    core_storage.migrate(engine, MIGRATIONS)
    engine.dispose()
    store = CostStore.open(database_url)
    try:
        budget = store.get_budget("acme/old")
        assert budget is not None and (budget.budget_id, budget.tenant) == ("old", "acme")
        assert store.window_spend("acme/old", 86400) == 450
        assert [a.event_id for a in store.alerts("acme/old")] == ["budget-threshold:old:86400:50"]
        assert store.get_budget("old") is None
        # the widened key columns hold a tenant-scoped RecordUsage key on PostgreSQL as well
        long_id = record("e" * 128, tenant="t" * 128, request_id="r" * 128)
        long_id.event_id, long_id.request_key = api_ledger_keys(long_id.tenant, "e" * 128, "r" * 128, "m" * 256)
        assert len(store.record_batch([long_id]).inserted) == 1
    finally:
        store.close()
