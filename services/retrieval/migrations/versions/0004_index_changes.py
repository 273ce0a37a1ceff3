"""`index_changes`: per collection, which document each generation changed (and whether its chunks
changed or only its access list / metadata), so a local index is brought up to date by applying
the documents changed since its generation instead of being rebuilt (llmo.retrieval.indexes).

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "index_changes",
        sa.Column("collection_pk", _ID, sa.ForeignKey("collections.pk", ondelete="CASCADE"), primary_key=True),
        sa.Column("generation", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("document_id", sa.String(63), nullable=False),
        sa.Column("content", sa.Boolean, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("index_changes")
