"""Initial router schema: bandit arms, processed events, prompt registry, experiments, requests.

Revision ID: router_0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "router_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "router_bandit_arms",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("scope", sa.String(256), primary_key=True),
        sa.Column("arm", sa.String(256), primary_key=True),
        sa.Column("alpha", sa.Float, nullable=False),
        sa.Column("beta", sa.Float, nullable=False),
        sa.Column("pulls", sa.Integer, nullable=False),
        sa.Column("rewards", sa.Integer, nullable=False),
        sa.Column("reward_sum", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "router_processed_events",
        sa.Column("event_id", sa.String(128), primary_key=True),
        sa.Column("processed_at", sa.Float, nullable=False),
    )
    op.create_table(
        "router_prompt_templates",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "router_prompt_versions",
        sa.Column("template", sa.String(200), sa.ForeignKey("router_prompt_templates.name"), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("variables", sa.JSON, nullable=False),
        sa.Column("token_count", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "router_prompt_labels",
        sa.Column("template", sa.String(200), sa.ForeignKey("router_prompt_templates.name"), primary_key=True),
        sa.Column("label", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
    )
    op.create_table(
        "router_experiments",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("allocation", sa.String(16), nullable=False),
        sa.Column("arms", sa.JSON, nullable=False),
        sa.Column("cost_weight", sa.Float, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "router_experiment_stats",
        sa.Column("experiment", sa.String(200), sa.ForeignKey("router_experiments.name"), primary_key=True),
        sa.Column("arm", sa.String(200), primary_key=True),
        sa.Column("requests", sa.Integer, nullable=False),
        sa.Column("cost_micros", sa.BigInteger, nullable=False),
        sa.Column("latency_ms_sum", sa.Float, nullable=False),
        sa.Column("feedback_count", sa.Integer, nullable=False),
        sa.Column("quality_sum", sa.Float, nullable=False),
    )
    op.create_table(
        "router_requests",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("scope", sa.String(256), nullable=False),
        sa.Column("arm", sa.String(256), nullable=False),
        sa.Column("experiment", sa.String(200), nullable=False),
        sa.Column("cost_micros", sa.BigInteger, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("feedback_score", sa.Float, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "router_requests",
        "router_experiment_stats",
        "router_experiments",
        "router_prompt_labels",
        "router_prompt_versions",
        "router_prompt_templates",
        "router_processed_events",
        "router_bandit_arms",
    ):
        op.drop_table(table)
