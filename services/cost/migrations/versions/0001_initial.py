"""Usage ledger, budgets, budget spend per window and fired threshold alerts.

Revision ID: 0001
Revises:
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_ledger",
        sa.Column("event_id", sa.String(128), primary_key=True),
        sa.Column("request_key", sa.String(400), nullable=False, unique=True),
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
    )
    op.create_index("ix_usage_ledger_occurred_at", "usage_ledger", ["occurred_at_us"])
    op.create_index("ix_usage_ledger_tenant_time", "usage_ledger", ["tenant", "occurred_at_us"])
    op.create_table(
        "budgets",
        sa.Column("budget_id", sa.String(64), primary_key=True),
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
    op.create_table(
        "budget_spend",
        sa.Column("budget_id", sa.String(64), sa.ForeignKey("budgets.budget_id", ondelete="CASCADE"), primary_key=True),
        sa.Column("window_start", sa.BigInteger, primary_key=True),
        sa.Column("spent_micros", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "budget_alerts",
        sa.Column("budget_id", sa.String(64), sa.ForeignKey("budgets.budget_id", ondelete="CASCADE"), primary_key=True),
        sa.Column("window_start", sa.BigInteger, primary_key=True),
        sa.Column("threshold_percent", sa.Integer, primary_key=True),
        sa.Column("event_id", sa.String(200), nullable=False, unique=True),
        sa.Column("spent_micros", sa.BigInteger, nullable=False),
        sa.Column("limit_micros", sa.BigInteger, nullable=False),
        sa.Column("fired_at_us", sa.BigInteger, nullable=False),
        sa.Column("published", sa.Boolean, nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    op.drop_table("budget_alerts")
    op.drop_table("budget_spend")
    op.drop_table("budgets")
    op.drop_index("ix_usage_ledger_tenant_time", "usage_ledger")
    op.drop_index("ix_usage_ledger_occurred_at", "usage_ledger")
    op.drop_table("usage_ledger")
