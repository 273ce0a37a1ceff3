"""Router state in SQL (SQLite by default, PostgreSQL by URL): bandit arms, prompt registry,
experiments, request log and feedback. Schema changes go through Alembic (`migrations/`)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llmo.core.storage import create_engine, migrate

MIGRATIONS = Path(__file__).parent / "migrations"

metadata = sa.MetaData()

bandit_arms = sa.Table(
    "router_bandit_arms",
    metadata,
    sa.Column("tenant", sa.String(128), primary_key=True),
    sa.Column("scope", sa.String(256), primary_key=True),
    sa.Column("arm", sa.String(256), primary_key=True),
    sa.Column("alpha", sa.Float, nullable=False, default=1.0),
    sa.Column("beta", sa.Float, nullable=False, default=1.0),
    sa.Column("pulls", sa.Integer, nullable=False, default=0),
    sa.Column("rewards", sa.Integer, nullable=False, default=0),
    sa.Column("reward_sum", sa.Float, nullable=False, default=0.0),
    sa.Column("updated_at", sa.Float, nullable=False),
)

processed_events = sa.Table(
    "router_processed_events",
    metadata,
    sa.Column("event_id", sa.String(128), primary_key=True),
    sa.Column("processed_at", sa.Float, nullable=False),
)

prompt_templates = sa.Table(
    "router_prompt_templates",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("created_at", sa.Float, nullable=False),
)

prompt_versions = sa.Table(
    "router_prompt_versions",
    metadata,
    sa.Column("template", sa.String(200), sa.ForeignKey("router_prompt_templates.name"), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("variables", sa.JSON, nullable=False),
    sa.Column("token_count", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

prompt_labels = sa.Table(
    "router_prompt_labels",
    metadata,
    sa.Column("template", sa.String(200), sa.ForeignKey("router_prompt_templates.name"), primary_key=True),
    sa.Column("label", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)

experiments = sa.Table(
    "router_experiments",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("allocation", sa.String(16), nullable=False),
    sa.Column("arms", sa.JSON, nullable=False),
    sa.Column("cost_weight", sa.Float, nullable=False, default=0.0),
    sa.Column("active", sa.Boolean, nullable=False, default=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

experiment_stats = sa.Table(
    "router_experiment_stats",
    metadata,
    sa.Column("experiment", sa.String(200), sa.ForeignKey("router_experiments.name"), primary_key=True),
    sa.Column("arm", sa.String(200), primary_key=True),
    sa.Column("requests", sa.Integer, nullable=False, default=0),
    sa.Column("cost_micros", sa.BigInteger, nullable=False, default=0),
    sa.Column("latency_ms_sum", sa.Float, nullable=False, default=0.0),
    sa.Column("feedback_count", sa.Integer, nullable=False, default=0),
    sa.Column("quality_sum", sa.Float, nullable=False, default=0.0),
)

requests_log = sa.Table(
    "router_requests",
    metadata,
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("scope", sa.String(256), nullable=False, default=""),
    sa.Column("arm", sa.String(256), nullable=False, default=""),
    sa.Column("experiment", sa.String(200), nullable=False, default=""),
    sa.Column("cost_micros", sa.BigInteger, nullable=False, default=0),
    sa.Column("latency_ms", sa.Float, nullable=False, default=0.0),
    sa.Column("feedback_score", sa.Float, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
)


def open_store(url: str) -> Engine:
    """Engine for `url`, migrated to the latest schema (blocking)."""
    engine = create_engine(url)
    migrate(engine, MIGRATIONS)
    return engine
