from __future__ import annotations

from datetime import UTC, datetime

import pytest

from llmo.cost.budgets import (
    Budget,
    BudgetGuard,
    BudgetValidationError,
    Decision,
    Window,
    reached_thresholds,
    window_key,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def guard_with(*budgets: Budget, spent: int = 0, clock: FakeClock | None = None) -> BudgetGuard:
    guard = BudgetGuard(reservation_ttl_s=10.0, clock=clock or FakeClock())
    guard.set_budgets(budgets)
    for b in budgets:
        window = b.window_at(NOW)
        assert window is not None
        guard.set_committed({(b.key, window_key(window[0])): spent})
    return guard


def test_windows() -> None:
    daily = Budget("d", "t", Window.DAILY, hard_limit_micros=1)
    assert daily.window_at(NOW) == (datetime(2026, 11, 25, tzinfo=UTC), datetime(2026, 11, 26, tzinfo=UTC))
    monthly = Budget("m", "t", Window.MONTHLY, hard_limit_micros=1)
    assert monthly.window_at(datetime(2026, 12, 31, 23, tzinfo=UTC)) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    custom = Budget("c", "t", Window.CUSTOM, hard_limit_micros=1, custom_start=NOW, custom_end=datetime(2026, 12, 1, tzinfo=UTC))
    assert custom.window_at(NOW) is not None
    assert custom.window_at(datetime(2026, 12, 1, tzinfo=UTC)) is None


def test_thresholds_are_exact_integer_comparisons() -> None:
    assert reached_thresholds(499_999, 1_000_000) == []
    assert reached_thresholds(500_000, 1_000_000) == [50]
    assert reached_thresholds(800_000, 1_000_000) == [50, 80]
    assert reached_thresholds(1_000_000, 1_000_000) == [50, 80, 100]


@pytest.mark.parametrize(
    ("budget", "field"),
    [
        (Budget("", "t", Window.DAILY, hard_limit_micros=1), "budget_id"),
        (Budget("a b", "t", Window.DAILY, hard_limit_micros=1), "budget_id"),
        (Budget("x" * 65, "t", Window.DAILY, hard_limit_micros=1), "budget_id"),
        (Budget("été", "t", Window.DAILY, hard_limit_micros=1), "budget_id"),
        (Budget("x", "t", Window.DAILY), "limit"),
        (Budget("x", "t", Window.DAILY, soft_limit_micros=5, hard_limit_micros=4), "soft_limit"),
        (Budget("x", "t", Window.CUSTOM, hard_limit_micros=4), "window"),
    ],
)
def test_invalid_budgets(budget: Budget, field: str) -> None:
    with pytest.raises(BudgetValidationError) as info:
        budget.validate()
    assert info.value.field == field


def test_allow_downgrade_deny() -> None:
    budget = Budget("b", "t", Window.DAILY, soft_limit_micros=600, hard_limit_micros=1000, downgrade_model="gpt-4o-mini")
    assert guard_with(budget, spent=100).check("t", "", "gpt-4o", 100, NOW, reserve=False).decision is Decision.ALLOW
    soft = guard_with(budget, spent=550).check("t", "", "gpt-4o", 100, NOW, reserve=False)
    assert (soft.decision, soft.reason, soft.downgrade_model) == (Decision.DOWNGRADE, "soft_limit_reached", "gpt-4o-mini")
    deny = guard_with(budget, spent=1000).check("t", "", "gpt-4o", 1, NOW, reserve=False)
    assert (deny.decision, deny.reason, deny.remaining_micros) == (Decision.DENY, "hard_limit_reached", 0)


def test_no_matching_budget_allows() -> None:
    budget = Budget("b", "t", Window.DAILY, hard_limit_micros=10, model="gpt-4o")
    guard = guard_with(budget, spent=10)
    assert guard.check("other-tenant", "", "gpt-4o", 1, NOW).reason == "no_budget"
    assert guard.check("t", "", "gpt-4o-mini", 1, NOW).reason == "no_budget"
    assert guard.check("t", "", "gpt-4o", 1, NOW).decision is Decision.DENY


def test_concurrent_admissions_overshoot_by_at_most_one_request() -> None:
    budget = Budget("b", "t", Window.DAILY, hard_limit_micros=1000)
    guard = guard_with(budget)
    admitted = 0
    for i in range(100):
        verdict = guard.check("t", "", "m", 300, NOW, reservation_id=f"r{i}")
        if verdict.decision is not Decision.DENY:
            admitted += 1
    # 4 * 300 = 1200: the fourth request is the one in flight when the headroom ran out
    assert admitted == 4
    assert guard.reserved("t/b", window_key(NOW.replace(hour=0))) == 1200


def test_recorded_usage_settles_the_reservation() -> None:
    budget = Budget("b", "t", Window.DAILY, hard_limit_micros=1000)
    guard = guard_with(budget)
    key = ("t/b", window_key(NOW.replace(hour=0)))
    guard.check("t", "", "m", 900, NOW, reservation_id="req-1")
    assert guard.check("t", "", "m", 200, NOW, reserve=False).decision is Decision.DOWNGRADE
    guard.add_committed({key: 850}, [("req-1", "other-tenant")])
    assert guard.reserved(*key) == 900  # usage of another tenant never settles it
    guard.add_committed({}, [("req-1", "t")])
    assert guard.reserved(*key) == 0
    assert guard.committed(*key) == 850
    assert guard.check("t", "", "m", 100, NOW, reserve=False).decision is Decision.ALLOW


def test_reservations_expire() -> None:
    clock = FakeClock()
    budget = Budget("b", "t", Window.DAILY, hard_limit_micros=1000)
    guard = guard_with(budget, clock=clock)
    guard.check("t", "", "m", 1000, NOW, reservation_id="lost")
    assert guard.check("t", "", "m", 1, NOW, reserve=False).decision is Decision.DENY
    clock.now = 11.0
    assert guard.check("t", "", "m", 1, NOW, reserve=False).decision is Decision.ALLOW


def test_release_and_rereserve_with_same_id_does_not_double_count() -> None:
    budget = Budget("b", "t", Window.DAILY, hard_limit_micros=1000)
    guard = guard_with(budget)
    key = ("t/b", window_key(NOW.replace(hour=0)))
    guard.check("t", "", "m", 400, NOW, reservation_id="same")
    guard.check("t", "", "m", 400, NOW, reservation_id="same")
    assert guard.reserved(*key) == 400
    assert guard.release("same") is True
    assert guard.release("same") is False
    assert guard.reserved(*key) == 0


def test_a_tenant_cannot_release_or_take_over_another_tenants_reservation() -> None:
    mine, theirs = Budget("a", "acme", Window.DAILY, hard_limit_micros=1000), Budget("g", "globex", Window.DAILY, hard_limit_micros=1000)
    guard = guard_with(mine, theirs)
    key = ("acme/a", window_key(NOW.replace(hour=0)))
    guard.check("acme", "", "m", 400, NOW, reservation_id="req-1")
    assert guard.release("req-1", "globex") is False and guard.reserved(*key) == 400
    # globex checking with acme's id gets a reservation of its own; acme's stays
    verdict = guard.check("globex", "", "m", 300, NOW, reservation_id="req-1")
    assert verdict.reservation_id not in ("", "req-1") and guard.reserved(*key) == 400
    assert guard.release("req-1", "acme") is True and guard.reserved(*key) == 0
    assert guard.release(verdict.reservation_id) is True  # no tenant given (an admin): any reservation


def test_most_restrictive_budget_decides_and_global_budgets_apply() -> None:
    tenant_budget = Budget("tenant", "t", Window.MONTHLY, hard_limit_micros=10_000)
    app_budget = Budget("app", "t", Window.DAILY, hard_limit_micros=100, application="chat")
    everyone = Budget("all", "", Window.DAILY, soft_limit_micros=50)
    guard = BudgetGuard()
    guard.set_budgets([tenant_budget, app_budget, everyone])
    guard.set_committed({("t/app", window_key(NOW.replace(hour=0))): 100})
    verdict = guard.check("t", "chat", "m", 1, NOW, reserve=False)
    assert (verdict.decision, verdict.budget_id) == (Decision.DENY, "app")
    assert set(verdict.matched) == {"tenant", "app", "all"}
    other = guard.check("t", "search", "m", 60, NOW, reserve=False)
    assert (other.decision, other.budget_id) == (Decision.DOWNGRADE, "all")


def test_negative_estimate_rejected() -> None:
    with pytest.raises(BudgetValidationError):
        BudgetGuard().check("t", "", "m", -1, NOW)


def test_a_renewed_reservation_is_not_dropped_by_its_old_expiry() -> None:
    clock = FakeClock()
    budget = Budget("b", "t", Window.DAILY, hard_limit_micros=1000)
    guard = guard_with(budget, clock=clock)
    guard.check("t", "", "m", 1000, NOW, reservation_id="r")
    clock.now = 5.0
    guard.check("t", "", "m", 1000, NOW, reservation_id="r")  # renewed: now expires at 15
    clock.now = 11.0
    assert guard.check("t", "", "m", 1, NOW, reserve=False).decision is Decision.DENY
    clock.now = 16.0
    assert guard.check("t", "", "m", 1, NOW, reserve=False).decision is Decision.ALLOW
