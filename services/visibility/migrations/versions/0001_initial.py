"""Projects; crawls with their frontier, pages and URL versions; share-of-voice runs and their
answers; referral visits; events to announce.

Revision ID: 0001
Revises:
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table('events',
    sa.Column('id', _ID, autoincrement=True, nullable=False),
    sa.Column('event_id', sa.String(length=256), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('payload', sa.LargeBinary(), nullable=False),
    sa.Column('published', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('event_id')
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index('ix_events_unpublished', ['published', 'id'], unique=False)

    op.create_table('projects',
    sa.Column('pk', _ID, autoincrement=True, nullable=False),
    sa.Column('tenant', sa.String(length=256), nullable=False),
    sa.Column('project_id', sa.String(length=63), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.Column('etag', sa.String(length=64), nullable=False),
    sa.Column('query_set_version', sa.BigInteger(), nullable=False),
    sa.Column('create_request_id', sa.String(length=128), nullable=False),
    sa.Column('create_us', sa.BigInteger(), nullable=False),
    sa.Column('update_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('tenant', 'project_id', name='uq_projects_tenant_id')
    )
    op.create_table('crawls',
    sa.Column('pk', _ID, autoincrement=True, nullable=False),
    sa.Column('project_pk', _ID, nullable=False),
    sa.Column('crawl_id', sa.String(length=63), nullable=False),
    sa.Column('spec', sa.LargeBinary(), nullable=False),
    sa.Column('state', sa.Integer(), nullable=False),
    sa.Column('discovered', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('fetched', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('failed', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('disallowed', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('trapped', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('unchanged', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('summary', sa.LargeBinary(), server_default='', nullable=False),
    sa.Column('error_reason', sa.String(length=128), server_default='', nullable=False),
    sa.Column('error_message', sa.Text(), server_default='', nullable=False),
    sa.Column('cancel_requested', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('create_request_id', sa.String(length=128), nullable=False),
    sa.Column('create_us', sa.BigInteger(), nullable=False),
    sa.Column('start_us', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('end_us', sa.BigInteger(), server_default='0', nullable=False),
    sa.ForeignKeyConstraint(['project_pk'], ['projects.pk'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('project_pk', 'crawl_id', name='uq_crawls_project_id')
    )
    with op.batch_alter_table('crawls', schema=None) as batch_op:
        batch_op.create_index('ix_crawls_state', ['state'], unique=False)

    op.create_table('sov_runs',
    sa.Column('pk', _ID, autoincrement=True, nullable=False),
    sa.Column('project_pk', _ID, nullable=False),
    sa.Column('run_id', sa.String(length=63), nullable=False),
    sa.Column('spec', sa.LargeBinary(), nullable=False),
    sa.Column('plan', sa.JSON(), nullable=False),
    sa.Column('state', sa.Integer(), nullable=False),
    sa.Column('answers_total', sa.BigInteger(), nullable=False),
    sa.Column('answers_completed', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('answers_failed', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('input_tokens', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('output_tokens', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('cost_micros', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('outcome', sa.LargeBinary(), server_default='', nullable=False),
    sa.Column('error_reason', sa.String(length=128), server_default='', nullable=False),
    sa.Column('error_message', sa.Text(), server_default='', nullable=False),
    sa.Column('cancel_requested', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('create_request_id', sa.String(length=128), nullable=False),
    sa.Column('create_us', sa.BigInteger(), nullable=False),
    sa.Column('start_us', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('end_us', sa.BigInteger(), server_default='0', nullable=False),
    sa.ForeignKeyConstraint(['project_pk'], ['projects.pk'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('project_pk', 'run_id', name='uq_sov_runs_project_id')
    )
    with op.batch_alter_table('sov_runs', schema=None) as batch_op:
        batch_op.create_index('ix_sov_runs_state', ['state'], unique=False)

    op.create_table('url_versions',
    sa.Column('project_pk', _ID, nullable=False),
    sa.Column('url_hash', sa.String(length=32), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('etag', sa.String(length=512), nullable=False),
    sa.Column('last_modified', sa.String(length=128), nullable=False),
    sa.Column('crawl_pk', _ID, nullable=False),
    sa.Column('page_id', sa.String(length=16), nullable=False),
    sa.Column('update_us', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['project_pk'], ['projects.pk'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('project_pk', 'url_hash')
    )
    op.create_table('visits',
    sa.Column('project_pk', _ID, nullable=False),
    sa.Column('visit_id', sa.String(length=128), nullable=False),
    sa.Column('visit_us', sa.BigInteger(), nullable=False),
    sa.Column('landing_url', sa.Text(), nullable=False),
    sa.Column('engine', sa.String(length=32), nullable=False),
    sa.Column('crawler', sa.String(length=64), nullable=False),
    sa.Column('count', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['project_pk'], ['projects.pk'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('project_pk', 'visit_id')
    )
    with op.batch_alter_table('visits', schema=None) as batch_op:
        batch_op.create_index('ix_visits_time', ['project_pk', 'visit_us'], unique=False)

    op.create_table('answers',
    sa.Column('run_pk', _ID, nullable=False),
    sa.Column('query_index', sa.Integer(), nullable=False),
    sa.Column('engine', sa.String(length=63), nullable=False),
    sa.Column('sample', sa.Integer(), nullable=False),
    sa.Column('failed', sa.Boolean(), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.Column('analysis', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['run_pk'], ['sov_runs.pk'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_pk', 'query_index', 'engine', 'sample')
    )
    op.create_table('frontier',
    sa.Column('crawl_pk', _ID, nullable=False),
    sa.Column('url_hash', sa.String(length=32), nullable=False),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('depth', sa.Integer(), nullable=False),
    sa.Column('done', sa.Boolean(), nullable=False),
    sa.Column('outcome', sa.String(length=32), server_default='', nullable=False),
    sa.ForeignKeyConstraint(['crawl_pk'], ['crawls.pk'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('crawl_pk', 'url_hash')
    )
    with op.batch_alter_table('frontier', schema=None) as batch_op:
        batch_op.create_index('ix_frontier_queue', ['crawl_pk', 'done', 'seq'], unique=False)

    op.create_table('pages',
    sa.Column('crawl_pk', _ID, nullable=False),
    sa.Column('page_id', sa.String(length=16), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('overall', sa.Float(), nullable=False),
    sa.Column('failed', sa.Boolean(), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.Column('passages', sa.JSON(), nullable=False),
    sa.Column('embeddings', sa.LargeBinary(), nullable=False),
    sa.Column('entity', sa.JSON(), nullable=False),
    sa.Column('fetch_us', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['crawl_pk'], ['crawls.pk'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('crawl_pk', 'page_id')
    )
    with op.batch_alter_table('pages', schema=None) as batch_op:
        batch_op.create_index('ix_pages_score', ['crawl_pk', 'overall', 'page_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('pages', schema=None) as batch_op:
        batch_op.drop_index('ix_pages_score')

    op.drop_table('pages')
    with op.batch_alter_table('frontier', schema=None) as batch_op:
        batch_op.drop_index('ix_frontier_queue')

    op.drop_table('frontier')
    op.drop_table('answers')
    with op.batch_alter_table('visits', schema=None) as batch_op:
        batch_op.drop_index('ix_visits_time')

    op.drop_table('visits')
    op.drop_table('url_versions')
    with op.batch_alter_table('sov_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_sov_runs_state')

    op.drop_table('sov_runs')
    with op.batch_alter_table('crawls', schema=None) as batch_op:
        batch_op.drop_index('ix_crawls_state')

    op.drop_table('crawls')
    op.drop_table('projects')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_unpublished')

    op.drop_table('events')
