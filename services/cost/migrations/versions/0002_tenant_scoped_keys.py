"""Tenant-scoped keys: budget ids are per tenant, RecordUsage ids per tenant.

Budgets are keyed by "<tenant>/<budget id>" (existing rows are re-keyed, with
their spend and alerts), and the key columns are widened for the tenant prefix
(SQLite does not enforce VARCHAR lengths; PostgreSQL does).

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WIDTHS = (
    ("usage_ledger", "event_id", 128, 300),
    ("usage_ledger", "request_key", 400, 700),
    ("budgets", "budget_id", 64, 300),
    ("budget_spend", "budget_id", 64, 300),
    ("budget_alerts", "budget_id", 64, 300),
    ("budget_alerts", "event_id", 200, 400),
)
_BUDGET_COLUMNS = (
    "display_name, tenant, application, model, window, soft_limit_micros, hard_limit_micros, "
    "custom_start_us, custom_end_us, downgrade_model, created_at_us"
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, column, old, new in _WIDTHS:
            op.alter_column(table, column, type_=sa.String(new), existing_type=sa.String(old))
    # old ids have no '/', keys always do: copy each budget under its key, move its rows, drop the old one
    quoted = _BUDGET_COLUMNS.replace("window", '"window"')
    op.execute(
        f"INSERT INTO budgets (budget_id, {quoted}) "
        f"SELECT tenant || '/' || budget_id, {quoted} FROM budgets WHERE budget_id NOT LIKE '%/%'"
    )
    for child in ("budget_spend", "budget_alerts"):
        op.execute(
            f"UPDATE {child} SET budget_id = (SELECT b.tenant || '/' || b.budget_id FROM budgets b "
            f"WHERE b.budget_id = {child}.budget_id) WHERE budget_id NOT LIKE '%/%'"
        )
    op.execute("DELETE FROM budgets WHERE budget_id NOT LIKE '%/%'")


def downgrade() -> None:
    raise NotImplementedError("budget keys cannot be made global again without collisions")
