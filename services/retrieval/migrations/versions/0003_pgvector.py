"""pgvector search rows (`LLMO_RETRIEVAL_BACKEND=pgvector`): `chunk_vectors` with an HNSW index
over the MiniLM vectors and a GIN index over `to_tsvector('english', text)`.

Created only on PostgreSQL with the `vector` extension installed in the database (the pgvector
backend installs it before migrating); a no-op on SQLite and on PostgreSQL without it. The
pgvector backend also creates the table at start when it is missing (a database migrated past
this revision before the extension was installed), with the same statements.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

from alembic import op

from llmo.retrieval.backends.pgvector import create_schema, has_extension

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql" and has_extension(bind):
        create_schema(bind)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TABLE IF EXISTS chunk_vectors")
