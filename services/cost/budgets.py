"""Budgets: windows, threshold detection and the in-memory admission guard.

The database is the source of truth for committed spend; ``BudgetGuard`` keeps a
copy in memory (refreshed from the database and advanced after every ledger
commit) so ``CheckBudget`` answers without I/O. Reservations make concurrent
admission safe: a request is admitted only while committed + reserved spend is
below the hard limit, and its estimate is reserved until its usage is recorded
(or the reservation expires). So the limit can be passed only by the request
admitted last, the one in flight when the headroom ran out.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

THRESHOLDS_PERCENT: tuple[int, ...] = (50, 80, 100)
# Budget ids: letters, digits, '-' and '_', at most this long (documented in the proto).
MAX_BUDGET_ID_LEN = 64


def budget_key(tenant: str, budget_id: str) -> str:
    """A budget's storage key: budget ids are per tenant, so two tenants may both have "a-secret".
    Budget ids never contain '/', so the key splits back at its last one."""
    return f"{tenant}/{budget_id}"


class Window(enum.StrEnum):
    DAILY = "daily"
    MONTHLY = "monthly"
    CUSTOM = "custom"


class Decision(enum.StrEnum):
    ALLOW = "allow"
    DOWNGRADE = "downgrade"
    DENY = "deny"


_SEVERITY = {Decision.ALLOW: 0, Decision.DOWNGRADE: 1, Decision.DENY: 2}


class BudgetValidationError(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class Budget:
    """A spending limit for a scope; an empty scope field matches anything."""

    budget_id: str
    tenant: str
    window: Window
    soft_limit_micros: int = 0
    hard_limit_micros: int = 0
    application: str = ""
    model: str = ""
    custom_start: datetime | None = None
    custom_end: datetime | None = None
    downgrade_model: str = ""
    display_name: str = ""

    @property
    def key(self) -> str:
        """Storage and spend key, unique across tenants (``budget_id`` is unique within one)."""
        return budget_key(self.tenant, self.budget_id)

    def validate(self) -> None:
        if len(self.budget_id) > MAX_BUDGET_ID_LEN:
            raise BudgetValidationError("budget_id", f"is {len(self.budget_id)} characters; the limit is {MAX_BUDGET_ID_LEN}")
        if not is_budget_id(self.budget_id):
            raise BudgetValidationError("budget_id", "must be non-empty letters, digits, '-' or '_'")
        if self.soft_limit_micros < 0 or self.hard_limit_micros < 0:
            raise BudgetValidationError("limit", "limits must not be negative")
        if not self.soft_limit_micros and not self.hard_limit_micros:
            raise BudgetValidationError("limit", "set a soft limit, a hard limit, or both")
        if self.soft_limit_micros and self.hard_limit_micros and self.soft_limit_micros > self.hard_limit_micros:
            raise BudgetValidationError("soft_limit", "soft limit must not exceed the hard limit")
        if self.window is Window.CUSTOM:
            if self.custom_start is None or self.custom_end is None:
                raise BudgetValidationError("window", "a custom window needs start and end")
            if self.custom_end <= self.custom_start:
                raise BudgetValidationError("window", "custom window end must be after its start")

    @property
    def limit_micros(self) -> int:
        """The limit thresholds are measured against: the hard limit, else the soft one."""
        return self.hard_limit_micros or self.soft_limit_micros

    def matches(self, tenant: str, application: str, model: str) -> bool:
        return (
            (not self.tenant or self.tenant == tenant)
            and (not self.application or self.application == application)
            and (not self.model or self.model == model)
        )

    def window_at(self, at: datetime) -> tuple[datetime, datetime] | None:
        """The [start, end) window containing ``at`` (UTC), or None outside a custom window."""
        at = at.astimezone(UTC)
        if self.window is Window.DAILY:
            start = datetime(at.year, at.month, at.day, tzinfo=UTC)
            return start, start + timedelta(days=1)
        if self.window is Window.MONTHLY:
            start = datetime(at.year, at.month, 1, tzinfo=UTC)
            end = datetime(at.year + (at.month == 12), at.month % 12 + 1, 1, tzinfo=UTC)
            return start, end
        assert self.custom_start is not None and self.custom_end is not None
        if self.custom_start <= at < self.custom_end:
            return self.custom_start, self.custom_end
        return None


def is_budget_id(value: str) -> bool:
    return 0 < len(value) <= MAX_BUDGET_ID_LEN and all(c.isascii() and (c.isalnum() or c in "-_") for c in value)


def reached_thresholds(spent_micros: int, limit_micros: int) -> list[int]:
    """Thresholds (percent) that ``spent`` has reached; integer comparison, no rounding."""
    if limit_micros <= 0:
        return []
    return [p for p in THRESHOLDS_PERCENT if spent_micros * 100 >= p * limit_micros]


def window_key(start: datetime) -> int:
    """Database key of a window: its start in whole seconds since the epoch."""
    return int(start.timestamp())


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reason: str
    budget_id: str = ""
    spent_micros: int = 0
    reserved_micros: int = 0
    limit_micros: int = 0
    downgrade_model: str = ""
    reservation_id: str = ""
    matched: tuple[str, ...] = ()

    @property
    def remaining_micros(self) -> int:
        return max(0, self.limit_micros - self.spent_micros - self.reserved_micros) if self.limit_micros else 0


@dataclass
class _Reservation:
    keys: list[tuple[str, int]]
    amount: int
    expires_at: float
    tenant: str = ""


@dataclass
class BudgetGuard:
    """Admission decisions from in-memory committed spend plus live reservations."""

    reservation_ttl_s: float = 120.0
    clock: Callable[[], float] = time.monotonic
    _budgets: dict[str, Budget] = field(default_factory=dict)
    _by_tenant: dict[str, list[Budget]] = field(default_factory=dict)
    _committed: dict[tuple[str, int], int] = field(default_factory=dict)
    _reserved: dict[tuple[str, int], int] = field(default_factory=dict)
    _reservations: dict[str, _Reservation] = field(default_factory=dict)
    # (expiry, reservation id) in expiry order: the TTL is fixed, so it is insertion order
    _expiry: deque[tuple[float, str]] = field(default_factory=deque)

    def _now(self) -> float:
        return self.clock()

    def set_budgets(self, budgets: Iterable[Budget]) -> None:
        self._budgets = {b.key: b for b in budgets}
        index: dict[str, list[Budget]] = {}
        for b in self._budgets.values():
            index.setdefault(b.tenant, []).append(b)
        self._by_tenant = index

    def budgets(self) -> list[Budget]:
        return list(self._budgets.values())

    def matching(self, tenant: str, application: str, model: str) -> list[Budget]:
        candidates = self._by_tenant.get(tenant, [])
        if tenant:
            candidates = candidates + self._by_tenant.get("", [])
        return [b for b in candidates if b.matches(tenant, application, model)]

    def set_committed(self, spend: Mapping[tuple[str, int], int]) -> None:
        """Replace committed spend with a snapshot read from the database."""
        self._committed = dict(spend)

    def add_committed(self, deltas: Mapping[tuple[str, int], int], settled: Iterable[tuple[str, str]] = ()) -> None:
        """Advance committed spend after a ledger commit and settle the reservations of those
        (request id, tenant) pairs: usage settles only a reservation held for its own tenant."""
        for key, delta in deltas.items():
            self._committed[key] = self._committed.get(key, 0) + delta
        for request_id, tenant in settled:
            self.release(request_id, tenant)

    def committed(self, key: str, window_start: int) -> int:
        return self._committed.get((key, window_start), 0)

    def reserved(self, key: str, window_start: int) -> int:
        """Reserved spend of the budget with storage key ``key`` (``Budget.key``) in a window."""
        return self._reserved.get((key, window_start), 0)

    def release(self, reservation_id: str, tenant: str | None = None) -> bool:
        """Give a reservation back; with ``tenant``, only one that tenant holds."""
        res = self._reservations.get(reservation_id)
        if res is None or (tenant is not None and res.tenant != tenant):
            return False
        del self._reservations[reservation_id]
        for key in res.keys:
            left = self._reserved.get(key, 0) - res.amount
            if left > 0:
                self._reserved[key] = left
            else:
                self._reserved.pop(key, None)
        return True

    def expire(self) -> int:
        now = self._now()
        expired = 0
        while self._expiry and self._expiry[0][0] <= now:
            at, rid = self._expiry.popleft()
            res = self._reservations.get(rid)
            if res is not None and res.expires_at == at:
                self.release(rid)
                expired += 1
        return expired

    def check(
        self,
        tenant: str,
        application: str,
        model: str,
        estimated_cost_micros: int,
        at: datetime,
        reservation_id: str = "",
        reserve: bool = True,
    ) -> Verdict:
        if estimated_cost_micros < 0:
            raise BudgetValidationError("estimated_cost", "must not be negative")
        if self._expiry:
            self.expire()
        if reserve and reservation_id:
            # a retried check of the same request replaces its reservation instead of competing with it
            self.release(reservation_id, tenant)
        worst: Verdict | None = None
        keys: list[tuple[str, int]] = []
        matched: list[str] = []
        for budget in self.matching(tenant, application, model):
            window = budget.window_at(at)
            if window is None:
                continue
            key = (budget.key, window_key(window[0]))
            keys.append(key)
            matched.append(budget.budget_id)
            verdict = self._judge(budget, key, estimated_cost_micros)
            if worst is None or _SEVERITY[verdict.decision] > _SEVERITY[worst.decision]:
                worst = verdict
        if worst is None:
            return Verdict(Decision.ALLOW, "no_budget")
        rid = ""
        if reserve and worst.decision is not Decision.DENY:
            # an id another tenant holds is never taken over: that reservation stays theirs
            rid = reservation_id if reservation_id and reservation_id not in self._reservations else uuid.uuid4().hex
            amount = max(estimated_cost_micros, 1)
            expires_at = self._now() + self.reservation_ttl_s
            self._reservations[rid] = _Reservation(keys, amount, expires_at, tenant)
            self._expiry.append((expires_at, rid))
            for key in keys:
                self._reserved[key] = self._reserved.get(key, 0) + amount
        return Verdict(
            decision=worst.decision,
            reason=worst.reason,
            budget_id=worst.budget_id,
            spent_micros=worst.spent_micros,
            reserved_micros=worst.reserved_micros,
            limit_micros=worst.limit_micros,
            downgrade_model=worst.downgrade_model,
            reservation_id=rid,
            matched=tuple(matched),
        )

    def _judge(self, budget: Budget, key: tuple[str, int], estimate: int) -> Verdict:
        spent = self._committed.get(key, 0)
        reserved = self._reserved.get(key, 0)
        used = spent + reserved
        hard, soft = budget.hard_limit_micros, budget.soft_limit_micros
        if hard and used >= hard:
            decision, reason = Decision.DENY, "hard_limit_reached"
        elif hard and used + estimate > hard:
            decision, reason = Decision.DOWNGRADE, "hard_limit_near"
        elif soft and used + estimate >= soft:
            decision, reason = Decision.DOWNGRADE, "soft_limit_reached"
        else:
            decision, reason = Decision.ALLOW, "within_budget"
        return Verdict(
            decision=decision,
            reason=reason,
            budget_id=budget.budget_id,
            spent_micros=spent,
            reserved_micros=reserved,
            limit_micros=budget.limit_micros,
            downgrade_model=budget.downgrade_model if decision is Decision.DOWNGRADE else "",
        )
