"""Datasets and examples, rubric versions and their generated G-Eval steps, gates, runs with their
example snapshots and results, scores with their events, scored live requests, drift alerts.

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

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table('datasets',
    sa.Column('pk', _ID, autoincrement=True, nullable=False),
    sa.Column('tenant', sa.String(length=256), nullable=False),
    sa.Column('dataset_id', sa.String(length=63), nullable=False),
    sa.Column('display_name', sa.String(length=1024), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('labels', sa.JSON(), nullable=False),
    sa.Column('etag', sa.String(length=64), nullable=False),
    sa.Column('version', sa.BigInteger(), nullable=False),
    sa.Column('create_request_id', sa.String(length=128), nullable=False),
    sa.Column('create_us', sa.BigInteger(), nullable=False),
    sa.Column('update_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('tenant', 'dataset_id', name='uq_datasets_tenant_id')
    )
    op.create_table('drift_alerts',
    sa.Column('tenant', sa.String(length=256), nullable=False),
    sa.Column('model', sa.String(length=256), nullable=False),
    sa.Column('prompt_version', sa.String(length=256), nullable=False),
    sa.Column('metric', sa.String(length=128), nullable=False),
    sa.Column('window_start_us', sa.BigInteger(), nullable=False),
    sa.Column('event_id', sa.String(length=256), nullable=False),
    sa.Column('create_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('tenant', 'model', 'prompt_version', 'metric', 'window_start_us')
    )
    op.create_table('gates',
    sa.Column('pk', _ID, autoincrement=True, nullable=False),
    sa.Column('tenant', sa.String(length=256), nullable=False),
    sa.Column('gate_id', sa.String(length=63), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.Column('etag', sa.String(length=64), nullable=False),
    sa.Column('create_us', sa.BigInteger(), nullable=False),
    sa.Column('update_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('tenant', 'gate_id', name='uq_gates_tenant_id')
    )
    op.create_table('rubric_steps',
    sa.Column('tenant', sa.String(length=256), nullable=False),
    sa.Column('rubric_hash', sa.String(length=64), nullable=False),
    sa.Column('steps', sa.JSON(), nullable=False),
    sa.Column('create_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('tenant', 'rubric_hash')
    )
    op.create_table('rubrics',
    sa.Column('tenant', sa.String(length=256), nullable=False),
    sa.Column('rubric_id', sa.String(length=63), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('create_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('tenant', 'rubric_id', 'version')
    )
    op.create_table('runs',
    sa.Column('pk', _ID, autoincrement=True, nullable=False),
    sa.Column('tenant', sa.String(length=256), nullable=False),
    sa.Column('run_id', sa.String(length=63), nullable=False),
    sa.Column('dataset_id', sa.String(length=63), nullable=False),
    sa.Column('spec', sa.LargeBinary(), nullable=False),
    sa.Column('state', sa.Integer(), nullable=False),
    sa.Column('examples_total', sa.BigInteger(), nullable=False),
    sa.Column('examples_completed', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('examples_failed', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('input_tokens', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('output_tokens', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('cost_micros', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('outcome', sa.LargeBinary(), server_default='', nullable=False),
    sa.Column('error_reason', sa.String(length=128), server_default='', nullable=False),
    sa.Column('error_message', sa.Text(), server_default='', nullable=False),
    sa.Column('cancel_requested', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('create_request_id', sa.String(length=128), nullable=False),
    sa.Column('fingerprint', sa.String(length=32), nullable=False),
    sa.Column('create_us', sa.BigInteger(), nullable=False),
    sa.Column('start_us', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('end_us', sa.BigInteger(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('tenant', 'run_id', name='uq_runs_tenant_id')
    )
    op.create_index('ix_runs_state', 'runs', ['state'], unique=False)
    op.create_index('ix_runs_tenant_created', 'runs', ['tenant', 'create_us'], unique=False)
    op.create_table('scored_requests',
    sa.Column('tenant', sa.String(length=256), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('request_id', sa.String(length=256), nullable=False),
    sa.Column('model', sa.String(length=256), nullable=False),
    sa.Column('prompt_version', sa.String(length=256), nullable=False),
    sa.Column('input_chars', sa.Integer(), nullable=False),
    sa.Column('output_chars', sa.Integer(), nullable=False),
    sa.Column('embedding', sa.LargeBinary(), nullable=False),
    sa.Column('occurred_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('tenant', 'source', 'request_id')
    )
    op.create_index('ix_scored_requests_time', 'scored_requests', ['tenant', 'occurred_us'], unique=False)
    op.create_table('scores',
    sa.Column('id', _ID, autoincrement=True, nullable=False),
    sa.Column('event_id', sa.String(length=256), nullable=False),
    sa.Column('tenant', sa.String(length=256), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('metric', sa.String(length=128), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('model', sa.String(length=256), nullable=False),
    sa.Column('prompt_version', sa.String(length=256), nullable=False),
    sa.Column('request_id', sa.String(length=256), nullable=False),
    sa.Column('occurred_us', sa.BigInteger(), nullable=False),
    sa.Column('published', sa.Boolean(), nullable=False),
    sa.Column('event', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('event_id')
    )
    op.create_index('ix_scores_drift', 'scores', ['tenant', 'source', 'metric', 'occurred_us'], unique=False)
    op.create_index('ix_scores_unpublished', 'scores', ['published', 'id'], unique=False)
    op.create_table('examples',
    sa.Column('dataset_pk', _ID, nullable=False),
    sa.Column('example_id', sa.String(length=63), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.Column('create_us', sa.BigInteger(), nullable=False),
    sa.Column('update_us', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['dataset_pk'], ['datasets.pk'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('dataset_pk', 'example_id')
    )
    op.create_table('run_items',
    sa.Column('run_pk', _ID, nullable=False),
    sa.Column('example_id', sa.String(length=63), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['run_pk'], ['runs.pk'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_pk', 'example_id')
    )
    op.create_table('run_results',
    sa.Column('run_pk', _ID, nullable=False),
    sa.Column('example_id', sa.String(length=63), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.Column('failed', sa.Boolean(), nullable=False),
    sa.Column('flagged', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['run_pk'], ['runs.pk'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_pk', 'example_id')
    )


def downgrade() -> None:
    op.drop_table("run_results")
    op.drop_table("run_items")
    op.drop_table("examples")
    op.drop_table("scores")
    op.drop_table("scored_requests")
    op.drop_table("runs")
    op.drop_table("rubrics")
    op.drop_table("rubric_steps")
    op.drop_table("gates")
    op.drop_table("drift_alerts")
    op.drop_table("datasets")
