"""The cost service's core: ledger ingest, budget state and threshold alerts.

Shared by the NATS consumers and the gRPC servicer. Database work runs in
threads; one lock orders "commit a batch, then advance in-memory spend" against
"re-read spend from the database", so the in-memory copy never counts a batch twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2
from prometheus_client import Counter

from llmo.core.events import EventPublisher
from llmo.core.limits import preview
from llmo.core.logging import get_logger
from llmo.cost.budgets import Budget, BudgetGuard, window_key
from llmo.cost.prices import PriceCatalog
from llmo.cost.records import LedgerRecord, UsageInput, price_usage
from llmo.cost.storage import Alert, BatchOutcome, CostStore
from llmo.protos.common.v1 import common_pb2
from llmo.protos.events.v1 import events_pb2

log = get_logger(__name__)

LEDGER_RECORDS = Counter("llmo_cost_ledger_records_total", "Usage records committed to the ledger", ["source"])
LEDGER_DUPLICATES = Counter("llmo_cost_ledger_duplicates_total", "Usage records already in the ledger (redelivery or re-publish)")
USAGE_REJECTED = Counter("llmo_cost_usage_rejected_total", "Usage events rejected (sent to the dead-letter subject)", ["reason"])
ALERTS_PUBLISHED = Counter("llmo_cost_budget_alerts_published_total", "Budget threshold alerts published", ["threshold"])


def _timestamp(us: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def alert_event(alert: Alert) -> events_pb2.BudgetThresholdCrossed:
    budget = alert.budget
    start = datetime.fromtimestamp(alert.window_start, tz=UTC)
    window = budget.window_at(start)
    end_us = int(window[1].timestamp() * 1_000_000) if window else 0
    return events_pb2.BudgetThresholdCrossed(
        event_id=alert.event_id,
        occurred_at=_timestamp(alert.fired_at_us),
        budget=f"budgets/{budget.budget_id}",
        threshold_percent=alert.threshold_percent,
        spent=common_pb2.Money(currency_code="USD", micros=alert.spent_micros),
        limit=common_pb2.Money(currency_code="USD", micros=alert.limit_micros),
        window_start=_timestamp(alert.window_start * 1_000_000),
        window_end=_timestamp(end_us),
        tenant=budget.tenant,
        application=budget.application,
        model=budget.model,
        hard=bool(budget.hard_limit_micros),
    )


class CostEngine:
    def __init__(
        self,
        store: CostStore,
        catalog: PriceCatalog,
        bus: EventPublisher | None = None,
        *,
        reservation_ttl_s: float = 120.0,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.bus = bus
        self.guard = BudgetGuard(reservation_ttl_s=reservation_ttl_s)
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        # Records this process committed (new ledger rows), for status and benchmarks.
        self.records_committed = 0

    async def start(self, *, refresh_s: float = 1.0, alert_retry_s: float = 5.0) -> None:
        await self.refresh()
        self._tasks.append(asyncio.create_task(self._every(refresh_s, self.refresh), name="cost:budget-refresh"))
        self._tasks.append(asyncio.create_task(self._every(alert_retry_s, self.publish_pending_alerts), name="cost:alerts"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _every(self, seconds: float, action: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await action()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("periodic task failed", task=getattr(action, "__name__", "?"), error=repr(error))

    async def refresh(self) -> None:
        """Re-read budgets and their current-window spend (the database is the source of truth)."""
        async with self._lock:
            budgets = await asyncio.to_thread(self.store.list_all_budgets)
            now = datetime.now(UTC)
            keys = []
            for budget in budgets:
                window = budget.window_at(now)
                if window is not None:
                    keys.append((budget.key, window_key(window[0])))
            snapshot = await asyncio.to_thread(self.store.spend_snapshot, keys)
            self.guard.set_budgets(budgets)
            self.guard.set_committed(snapshot)

    def price(self, usage: UsageInput) -> LedgerRecord:
        return price_usage(usage, self.catalog)

    async def ingest(self, records: Sequence[LedgerRecord]) -> BatchOutcome:
        """Commit priced records (one transaction) and advance budget state; then publish alerts."""
        async with self._lock:
            outcome = await asyncio.to_thread(self.store.record_batch, records)
            self.guard.add_committed(outcome.deltas, ((r.request_id, r.tenant) for r in records if r.request_id))
            self.records_committed += len(outcome.inserted)
        by_source: dict[str, int] = {}
        for record in outcome.inserted:
            by_source[record.source] = by_source.get(record.source, 0) + 1
        for source, count in by_source.items():
            LEDGER_RECORDS.labels(source).inc(count)
        if outcome.duplicates:
            LEDGER_DUPLICATES.inc(outcome.duplicates)
        if outcome.alerts:
            await self.publish_alerts(outcome.alerts)
        return outcome

    async def publish_alerts(self, alerts: Sequence[Alert]) -> int:
        """Publish alerts (deterministic event ids) and mark them published; failures are retried later."""
        if self.bus is None or not alerts:
            return 0
        done = []
        for alert in alerts:
            try:
                await self.bus.publish(alert_event(alert), event_id=alert.event_id)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # bounded: a failed publish is retried every few seconds, its log line must stay small
                log.warning("budget alert publish failed; will retry", event_id=preview(alert.event_id), error=preview(repr(error), 300))
                continue
            ALERTS_PUBLISHED.labels(str(alert.threshold_percent)).inc()
            log.info(
                "budget threshold crossed",
                budget=alert.budget.budget_id,
                tenant=alert.budget.tenant,
                threshold_percent=alert.threshold_percent,
                spent_micros=alert.spent_micros,
                limit_micros=alert.limit_micros,
            )
            done.append(alert.event_id)
        await asyncio.to_thread(self.store.mark_published, done)
        return len(done)

    async def publish_pending_alerts(self) -> None:
        if self.bus is None:
            return
        pending = await asyncio.to_thread(self.store.alerts, None, True)
        await self.publish_alerts(pending)

    async def create_budget(self, budget: Budget) -> bool:
        created, alerts = await asyncio.to_thread(self.store.create_budget, budget, datetime.now(UTC))
        if created:
            await self.refresh()
            await self.publish_alerts(alerts)
        return created

    async def delete_budget(self, key: str) -> bool:
        deleted = await asyncio.to_thread(self.store.delete_budget, key)
        if deleted:
            await self.refresh()
        return deleted
