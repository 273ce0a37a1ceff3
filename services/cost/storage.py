"""SQL storage of the cost service (SQLAlchemy 2 Core; SQLite or PostgreSQL).

Every method is blocking; callers run them off the event loop. ``record_batch``
is the exactly-once write: ledger rows, budget spend and threshold alerts of one
batch commit in a single transaction, and a redelivered or re-published event
inserts nothing (ON CONFLICT DO NOTHING on the event id and the request key).

Key widths: ledger event keys hold a tenant-scoped ``RecordUsage`` id
(``records.api_ledger_keys``), budget keys are ``<tenant>/<budget id>``
(``budgets.budget_key``); migration 0002 widened the columns for them.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from llmo.core import storage as core_storage
from llmo.cost.budgets import Budget, Window, reached_thresholds, window_key
from llmo.cost.records import LedgerRecord, Source

MIGRATIONS = Path(__file__).parent / "migrations"

metadata = sa.MetaData()

usage_ledger = sa.Table(
    "usage_ledger",
    metadata,
    sa.Column("event_id", sa.String(300), primary_key=True),
    sa.Column("request_key", sa.String(700), nullable=False, unique=True),
    sa.Column("request_id", sa.String(128), nullable=False, server_default=""),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("occurred_at_us", sa.BigInteger, nullable=False),
    sa.Column("day", sa.String(10), nullable=False),
    sa.Column("hour", sa.String(13), nullable=False),
    sa.Column("tenant", sa.String(256), nullable=False),
    sa.Column("application", sa.String(256), nullable=False),
    sa.Column("user_id", sa.String(256), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("provider", sa.String(256), nullable=False),
    sa.Column("prompt_version", sa.String(256), nullable=False),
    sa.Column("route_reason", sa.String(256), nullable=False),
    sa.Column("input_tokens", sa.BigInteger, nullable=False),
    sa.Column("cached_input_tokens", sa.BigInteger, nullable=False),
    sa.Column("output_tokens", sa.BigInteger, nullable=False),
    sa.Column("cost_micros", sa.BigInteger, nullable=False),
    sa.Column("ttft_ms", sa.Float, nullable=True),
    sa.Column("latency_ms", sa.Float, nullable=True),
    sa.Index("ix_usage_ledger_occurred_at", "occurred_at_us"),
    sa.Index("ix_usage_ledger_tenant_time", "tenant", "occurred_at_us"),
)

budgets_table = sa.Table(
    "budgets",
    metadata,
    # the budget's key, "<tenant>/<budget id>" (Budget.key): ids are per tenant
    sa.Column("budget_id", sa.String(300), primary_key=True),
    sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
    sa.Column("tenant", sa.String(256), nullable=False),
    sa.Column("application", sa.String(256), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("window", sa.String(16), nullable=False),
    sa.Column("soft_limit_micros", sa.BigInteger, nullable=False),
    sa.Column("hard_limit_micros", sa.BigInteger, nullable=False),
    sa.Column("custom_start_us", sa.BigInteger, nullable=True),
    sa.Column("custom_end_us", sa.BigInteger, nullable=True),
    sa.Column("downgrade_model", sa.String(256), nullable=False),
    sa.Column("created_at_us", sa.BigInteger, nullable=False),
)

budget_spend = sa.Table(
    "budget_spend",
    metadata,
    sa.Column("budget_id", sa.String(300), sa.ForeignKey("budgets.budget_id", ondelete="CASCADE"), primary_key=True),
    sa.Column("window_start", sa.BigInteger, primary_key=True),
    sa.Column("spent_micros", sa.BigInteger, nullable=False),
)

budget_alerts = sa.Table(
    "budget_alerts",
    metadata,
    sa.Column("budget_id", sa.String(300), sa.ForeignKey("budgets.budget_id", ondelete="CASCADE"), primary_key=True),
    sa.Column("window_start", sa.BigInteger, primary_key=True),
    sa.Column("threshold_percent", sa.Integer, primary_key=True),
    sa.Column("event_id", sa.String(400), nullable=False, unique=True),
    sa.Column("spent_micros", sa.BigInteger, nullable=False),
    sa.Column("limit_micros", sa.BigInteger, nullable=False),
    sa.Column("fired_at_us", sa.BigInteger, nullable=False),
    sa.Column("published", sa.Boolean, nullable=False, server_default=sa.false()),
)

_LEDGER_COLUMNS = tuple(c.name for c in usage_ledger.columns)
_SQLITE_ROWS_PER_INSERT = 50  # 1,000 bound values per statement, far below SQLite's limit


@functools.lru_cache(maxsize=8)
def _sqlite_insert(rows: int) -> str:
    values = "(" + ", ".join("?" * len(_LEDGER_COLUMNS)) + ")"
    return f"INSERT INTO usage_ledger ({', '.join(_LEDGER_COLUMNS)}) VALUES {', '.join([values] * rows)} ON CONFLICT DO NOTHING"

GROUP_COLUMNS: dict[str, sa.Column[Any]] = {
    "tenant": usage_ledger.c.tenant,
    "application": usage_ledger.c.application,
    "user": usage_ledger.c.user_id,
    "model": usage_ledger.c.model,
    "provider": usage_ledger.c.provider,
    "prompt_version": usage_ledger.c.prompt_version,
    "route_reason": usage_ledger.c.route_reason,
    "day": usage_ledger.c.day,
    "hour": usage_ledger.c.hour,
    "request_id": usage_ledger.c.request_id,
}
FILTER_COLUMNS = ("tenant", "application", "model", "provider")


def alert_event_id(budget_key: str, window_start: int, threshold: int) -> str:
    """Deterministic id, so a re-published alert is dropped by JetStream and by consumers;
    it names the budget's key, so two tenants' budgets of the same id never share one."""
    return f"budget-threshold:{budget_key}:{window_start}:{threshold}"


@dataclass(frozen=True)
class Alert:
    budget: Budget
    window_start: int
    threshold_percent: int
    event_id: str
    spent_micros: int
    limit_micros: int
    fired_at_us: int


@dataclass
class BatchOutcome:
    inserted: list[LedgerRecord] = field(default_factory=list)
    duplicates: int = 0
    enriched: int = 0
    deltas: dict[tuple[str, int], int] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)


@dataclass(frozen=True)
class ReportQuery:
    start_us: int
    end_us: int
    group_by: tuple[str, ...]
    filters: dict[str, str]
    offset: int
    limit: int


@dataclass(frozen=True)
class ReportRow:
    keys: dict[str, str]
    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_micros: int
    ttft_ms: list[float]
    latency_ms: list[float]


_ROUTER = Source.ROUTER.value
Attribution = tuple[str, str, str]  # (tenant, application, user)


@dataclass(frozen=True)
class _Move:
    """A recorded call whose attribution the router's event corrected."""

    cost_micros: int
    model: str
    occurred_at_us: int
    before: Attribution
    after: Attribution

    @property
    def occurred_at(self) -> datetime:
        return datetime.fromtimestamp(self.occurred_at_us / 1_000_000, tz=UTC)


def _charge(
    deltas: dict[tuple[str, int], int], budgets: list[Budget], cost: int, who: Attribution, model: str, at: datetime
) -> None:
    """Add ``cost`` to the window spend of every budget matching the attribution."""
    if cost == 0:
        return
    for budget in budgets:
        if not budget.matches(who[0], who[1], model):
            continue
        window = budget.window_at(at)
        if window is None:
            continue
        key = (budget.key, window_key(window[0]))
        deltas[key] = deltas.get(key, 0) + cost


def _now_us() -> int:
    return int(datetime.now(UTC).timestamp() * 1_000_000)


def _us(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1_000_000)


def _dt(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value / 1_000_000, tz=UTC)


class CostStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        self._checkpointer: core_storage.WalCheckpointer | None = None
        if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
            # ledger batches commit back to back: WAL checkpoints run beside them, not inside them
            self._checkpointer = core_storage.WalCheckpointer(engine)
            self._checkpointer.start()

    @classmethod
    def open(cls, url: str, migrate: bool = True) -> CostStore:
        engine = core_storage.create_engine(url, background_checkpoint=True)
        if migrate:
            core_storage.migrate(engine, MIGRATIONS)
        return cls(engine)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        self.engine.dispose()

    # ledger

    def record_batch(self, records: Sequence[LedgerRecord]) -> BatchOutcome:
        outcome = BatchOutcome()
        unique: dict[str, LedgerRecord] = {}
        for record in records:
            unique.setdefault(record.event_id, record)
        outcome.duplicates = len(records) - len(unique)
        if not unique:
            return outcome
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "sqlite":
                # take the write lock now: the batch's reads and writes see no other writer
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            inserted_ids = self._insert_ledger_rows(conn, list(unique.values()))
            outcome.inserted = [r for r in unique.values() if r.event_id in inserted_ids]
            outcome.duplicates += len(unique) - len(inserted_ids)
            routed = [r for r in unique.values() if r.source == _ROUTER and r.event_id not in inserted_ids]
            moves = self._apply_router_attribution(conn, routed) if routed else []
            outcome.enriched = len(moves)
            budgets = self._load_budgets(conn)
            for record in outcome.inserted:
                _charge(outcome.deltas, budgets, record.cost_micros, record.attribution(), record.model, record.occurred_at)
            for move in moves:
                # the row's cost leaves the budgets of its old attribution for those of the router's
                _charge(outcome.deltas, budgets, -move.cost_micros, move.before, move.model, move.occurred_at)
                _charge(outcome.deltas, budgets, move.cost_micros, move.after, move.model, move.occurred_at)
            by_key = {b.key: b for b in budgets}
            for key, delta in outcome.deltas.items():
                if delta == 0:
                    continue
                total = self._add_spend(conn, key, delta)
                if delta > 0:
                    outcome.alerts += self._fire_thresholds(conn, by_key[key[0]], key[1], total)
            outcome.deltas = {key: delta for key, delta in outcome.deltas.items() if delta}
        return outcome

    def _insert_ledger_rows(self, conn: Connection, records: list[LedgerRecord]) -> set[str]:
        """Insert rows, skipping any whose event id or request key exists; returns the inserted ids.

        PostgreSQL: plain DBAPI executemany (SQLAlchemy's per-row fallback for
        ON CONFLICT ... RETURNING costs a round trip per row).
        """
        params = [r.params() for r in records]
        if self.engine.dialect.name == "postgresql":
            sql = (
                f"INSERT INTO usage_ledger ({', '.join(_LEDGER_COLUMNS)}) "
                f"VALUES ({', '.join(['%s'] * len(_LEDGER_COLUMNS))}) ON CONFLICT DO NOTHING RETURNING event_id"
            )
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            inserted: set[str] = set()
            cursor.executemany(sql, params, returning=True)
            while True:
                inserted.update(row[0] for row in cursor.fetchall())
                if not cursor.nextset():
                    break
            return inserted
        # SQLite: this transaction holds the write lock, and rowids of new rows are
        # assigned above the current maximum, so the rows past it are exactly ours.
        before = conn.exec_driver_sql("SELECT COALESCE(MAX(rowid), 0) FROM usage_ledger").scalar_one()
        # Many rows per statement: executemany gives up and re-takes the GIL for
        # every row, and then waits behind the busy event loop thread each time.
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        skipped = False
        for start in range(0, len(params), _SQLITE_ROWS_PER_INSERT):
            chunk = params[start : start + _SQLITE_ROWS_PER_INSERT]
            cursor.execute(_sqlite_insert(len(chunk)), list(itertools.chain.from_iterable(chunk)))
            skipped = skipped or cursor.rowcount != len(chunk)
        cursor.close()
        if not skipped:
            return {r.event_id for r in records}  # the common case: no reading back, row by row
        found = conn.exec_driver_sql("SELECT event_id FROM usage_ledger WHERE rowid > ?", (before,))
        return {row[0] for row in found}

    def _apply_router_attribution(self, conn: Connection, routed: list[LedgerRecord]) -> list[_Move]:
        """Router events that found their call already recorded (from the inference event):
        the router's non-empty tenant, application and user replace the row's, and its
        route reason and prompt version fill the row's empty ones. One read and one
        executemany for the whole batch; returns the changed rows' attribution moves."""
        c = usage_ledger.c
        by_key = {r.request_key: r for r in routed}
        existing: list[Any] = []
        keys = list(by_key)
        for start in range(0, len(keys), 500):
            existing += conn.execute(
                sa.select(
                    c.event_id, c.request_key, c.tenant, c.application, c.user_id, c.model,
                    c.cost_micros, c.occurred_at_us, c.route_reason, c.prompt_version,
                ).where(c.request_key.in_(keys[start : start + 500]))
            ).all()
        moves: list[_Move] = []
        updates: list[dict[str, object]] = []
        for row in existing:
            record = by_key[row.request_key]
            if row.event_id == record.event_id:
                continue  # a redelivery of the router event itself
            before = (row.tenant, row.application, row.user_id)
            after = (record.tenant or row.tenant, record.application or row.application, record.user or row.user_id)
            route_reason = row.route_reason or record.route_reason
            prompt_version = row.prompt_version or record.prompt_version
            if (after, route_reason, prompt_version) == (before, row.route_reason, row.prompt_version):
                continue
            updates.append(
                {"key": row.event_id, "t": after[0], "a": after[1], "u": after[2], "rr": route_reason, "pv": prompt_version}
            )
            moves.append(_Move(int(row.cost_micros), row.model, int(row.occurred_at_us), before, after))
        if updates:
            conn.execute(
                sa.update(usage_ledger)
                .where(c.event_id == sa.bindparam("key"))
                .values(
                    tenant=sa.bindparam("t"),
                    application=sa.bindparam("a"),
                    user_id=sa.bindparam("u"),
                    route_reason=sa.bindparam("rr"),
                    prompt_version=sa.bindparam("pv"),
                ),
                updates,
            )
        return moves

    def _add_spend(self, conn: Connection, key: tuple[str, int], delta: int) -> int:
        insert = self._insert(budget_spend).values(budget_id=key[0], window_start=key[1], spent_micros=delta)
        stmt = insert.on_conflict_do_update(
            index_elements=[budget_spend.c.budget_id, budget_spend.c.window_start],
            set_={"spent_micros": budget_spend.c.spent_micros + insert.excluded.spent_micros},
        ).returning(budget_spend.c.spent_micros)
        return int(conn.execute(stmt).scalar_one())

    def _fire_thresholds(self, conn: Connection, budget: Budget, window_start: int, spent: int) -> list[Alert]:
        fired = []
        limit = budget.limit_micros
        for pct in reached_thresholds(spent, limit):
            alert = Alert(budget, window_start, pct, alert_event_id(budget.key, window_start, pct), spent, limit, _now_us())
            stmt = (
                self._insert(budget_alerts)
                .values(
                    budget_id=budget.key,
                    window_start=window_start,
                    threshold_percent=pct,
                    event_id=alert.event_id,
                    spent_micros=spent,
                    limit_micros=limit,
                    fired_at_us=alert.fired_at_us,
                    published=False,
                )
                .on_conflict_do_nothing()
                .returning(budget_alerts.c.event_id)
            )
            if conn.execute(stmt).first() is not None:
                fired.append(alert)
        return fired

    def ledger_totals(self, tenant: str | None = None) -> tuple[int, int]:
        """(records, cost micros) in the whole ledger (or one tenant's part)."""
        stmt = sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(usage_ledger.c.cost_micros), 0))
        if tenant is not None:
            stmt = stmt.where(usage_ledger.c.tenant == tenant)
        with self.engine.connect() as conn:
            count, cost = conn.execute(stmt).one()
        return int(count), int(cost)

    def get_record(self, event_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(usage_ledger).where(usage_ledger.c.event_id == event_id)).mappings().first()
        return dict(row) if row else None

    # budgets

    def _load_budgets(self, conn: Connection) -> list[Budget]:
        return [_budget_from_row(row) for row in conn.execute(sa.select(budgets_table)).mappings()]

    def list_all_budgets(self) -> list[Budget]:
        with self.engine.connect() as conn:
            return self._load_budgets(conn)

    def create_budget(self, budget: Budget, now: datetime) -> tuple[bool, list[Alert]]:
        """Insert a budget with the spend its scope already has in the current window.

        Returns (created, alerts); created is False when the id is taken.
        """
        with self.engine.begin() as conn:
            stmt = (
                self._insert(budgets_table)
                .values(**_budget_row(budget))
                .on_conflict_do_nothing()
                .returning(budgets_table.c.budget_id)
            )
            if conn.execute(stmt).first() is None:
                return False, []
            window = budget.window_at(now)
            if window is None:
                return True, []
            c = usage_ledger.c
            query = sa.select(sa.func.coalesce(sa.func.sum(c.cost_micros), 0)).where(
                c.occurred_at_us >= _us(window[0]), c.occurred_at_us < _us(window[1])
            )
            for name, column in (("tenant", c.tenant), ("application", c.application), ("model", c.model)):
                value = getattr(budget, name)
                if value:
                    query = query.where(column == value)
            spent = int(conn.execute(query).scalar_one())
            if spent == 0:
                return True, []
            start = window_key(window[0])
            total = self._add_spend(conn, (budget.key, start), spent)
            return True, self._fire_thresholds(conn, budget, start, total)

    def get_budget(self, key: str) -> Budget | None:
        """The budget with storage key ``key`` (``budget_key(tenant, budget_id)``)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(budgets_table).where(budgets_table.c.budget_id == key)).mappings().first()
        return _budget_from_row(row) if row else None

    def budgets_named(self, budget_id: str) -> list[Budget]:
        """Every tenant's budget with this id (admins naming a budget without its tenant)."""
        with self.engine.connect() as conn:
            return [b for b in self._load_budgets(conn) if b.budget_id == budget_id]

    def list_budgets(self, tenant: str, offset: int, limit: int) -> list[Budget]:
        stmt = sa.select(budgets_table).order_by(budgets_table.c.budget_id).offset(offset).limit(limit)
        if tenant:
            stmt = stmt.where(budgets_table.c.tenant == tenant)
        with self.engine.connect() as conn:
            return [_budget_from_row(row) for row in conn.execute(stmt).mappings()]

    def delete_budget(self, key: str) -> bool:
        with self.engine.begin() as conn:
            for table in (budget_alerts, budget_spend):
                conn.execute(sa.delete(table).where(table.c.budget_id == key))
            result = conn.execute(sa.delete(budgets_table).where(budgets_table.c.budget_id == key))
            return bool(result.rowcount)

    def spend_snapshot(self, keys: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        wanted = list(keys)
        if not wanted:
            return {}
        stmt = sa.select(budget_spend).where(
            sa.tuple_(budget_spend.c.budget_id, budget_spend.c.window_start).in_(wanted)
        )
        with self.engine.connect() as conn:
            return {(r.budget_id, int(r.window_start)): int(r.spent_micros) for r in conn.execute(stmt)}

    def window_spend(self, key: str, window_start: int) -> int:
        return self.spend_snapshot([(key, window_start)]).get((key, window_start), 0)

    def alerts(self, key: str | None = None, unpublished_only: bool = False) -> list[Alert]:
        """Fired alerts (of the budget with storage key ``key``)."""
        stmt = sa.select(budget_alerts).order_by(budget_alerts.c.fired_at_us, budget_alerts.c.threshold_percent)
        if key:
            stmt = stmt.where(budget_alerts.c.budget_id == key)
        if unpublished_only:
            stmt = stmt.where(budget_alerts.c.published == sa.false())
        with self.engine.connect() as conn:
            rows = list(conn.execute(stmt).mappings())
            budgets = {b.key: b for b in self._load_budgets(conn)}
        return [
            Alert(
                budgets[r["budget_id"]],
                int(r["window_start"]),
                int(r["threshold_percent"]),
                r["event_id"],
                int(r["spent_micros"]),
                int(r["limit_micros"]),
                int(r["fired_at_us"]),
            )
            for r in rows
            if r["budget_id"] in budgets
        ]

    def mark_published(self, event_ids: Sequence[str]) -> None:
        if not event_ids:
            return
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(budget_alerts).where(budget_alerts.c.event_id.in_(list(event_ids))).values(published=True)
            )

    # reports

    def report(self, query: ReportQuery) -> tuple[list[ReportRow], bool]:
        """One page of grouped totals; the bool says whether more groups follow."""
        c = usage_ledger.c
        group_cols = [GROUP_COLUMNS[name].label(f"g_{name}") for name in query.group_by]
        conditions = [c.occurred_at_us >= query.start_us, c.occurred_at_us < query.end_us]
        for name, value in query.filters.items():
            conditions.append(GROUP_COLUMNS[name] == value)
        totals = (
            sa.select(
                *group_cols,
                sa.func.count().label("requests"),
                sa.func.sum(c.input_tokens).label("input_tokens"),
                sa.func.sum(c.cached_input_tokens).label("cached_input_tokens"),
                sa.func.sum(c.output_tokens).label("output_tokens"),
                sa.func.sum(c.cost_micros).label("cost_micros"),
            )
            .where(*conditions)
            .offset(query.offset)
            .limit(query.limit + 1)
        )
        if group_cols:
            totals = totals.group_by(*group_cols).order_by(*group_cols)
        with self.engine.connect() as conn:
            rows = list(conn.execute(totals).mappings())
            more = len(rows) > query.limit
            rows = rows[: query.limit]
            if rows and rows[0]["requests"] == 0:
                rows = []
            latencies = self._latencies(conn, query, conditions, rows)
        out = []
        for row in rows:
            keys = {name: str(row[f"g_{name}"]) for name in query.group_by}
            ttft, e2e = latencies.get(tuple(keys.values()), ([], []))
            out.append(
                ReportRow(
                    keys=keys,
                    requests=int(row["requests"]),
                    input_tokens=int(row["input_tokens"] or 0),
                    cached_input_tokens=int(row["cached_input_tokens"] or 0),
                    output_tokens=int(row["output_tokens"] or 0),
                    cost_micros=int(row["cost_micros"] or 0),
                    ttft_ms=sorted(ttft),
                    latency_ms=sorted(e2e),
                )
            )
        return out, more

    def _latencies(
        self, conn: Connection, query: ReportQuery, conditions: list[Any], rows: list[Any]
    ) -> dict[tuple[str, ...], tuple[list[float], list[float]]]:
        """TTFT and end-to-end latency samples of the groups on this page (percentiles need them all)."""
        if not rows:
            return {}
        c = usage_ledger.c
        cols = [GROUP_COLUMNS[name] for name in query.group_by]
        wanted = {tuple(str(row[f"g_{name}"]) for name in query.group_by) for row in rows}
        stmt = sa.select(*cols, c.ttft_ms, c.latency_ms).where(*conditions)
        stmt = stmt.where(sa.or_(c.ttft_ms.is_not(None), c.latency_ms.is_not(None)))
        if cols and len(wanted) <= 500:
            stmt = stmt.where(sa.tuple_(*cols).in_(list(wanted)))
        out: dict[tuple[str, ...], tuple[list[float], list[float]]] = {}
        for r in conn.execute(stmt):
            key = tuple(str(v) for v in r[: len(cols)])
            if key not in wanted:
                continue
            ttft, e2e = out.setdefault(key, ([], []))
            if r.ttft_ms is not None:
                ttft.append(float(r.ttft_ms))
            if r.latency_ms is not None:
                e2e.append(float(r.latency_ms))
        return out

    def daily_spend(self, start_us: int, end_us: int, filters: dict[str, str]) -> dict[str, int]:
        c = usage_ledger.c
        stmt = (
            sa.select(c.day, sa.func.sum(c.cost_micros))
            .where(c.occurred_at_us >= start_us, c.occurred_at_us < end_us)
            .group_by(c.day)
        )
        for name, value in filters.items():
            stmt = stmt.where(GROUP_COLUMNS[name] == value)
        with self.engine.connect() as conn:
            return {str(day): int(total) for day, total in conn.execute(stmt)}


def _budget_row(budget: Budget) -> dict[str, Any]:
    return {
        "budget_id": budget.key,
        "display_name": budget.display_name,
        "tenant": budget.tenant,
        "application": budget.application,
        "model": budget.model,
        "window": budget.window.value,
        "soft_limit_micros": budget.soft_limit_micros,
        "hard_limit_micros": budget.hard_limit_micros,
        "custom_start_us": _us(budget.custom_start),
        "custom_end_us": _us(budget.custom_end),
        "downgrade_model": budget.downgrade_model,
        "created_at_us": _now_us(),
    }


def _budget_from_row(row: Any) -> Budget:
    return Budget(
        budget_id=row["budget_id"][len(row["tenant"]) + 1 :],
        display_name=row["display_name"],
        tenant=row["tenant"],
        application=row["application"],
        model=row["model"],
        window=Window(row["window"]),
        soft_limit_micros=int(row["soft_limit_micros"]),
        hard_limit_micros=int(row["hard_limit_micros"]),
        custom_start=_dt(row["custom_start_us"]),
        custom_end=_dt(row["custom_end_us"]),
        downgrade_model=row["downgrade_model"],
    )
