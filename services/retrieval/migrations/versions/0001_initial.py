"""Collections per tenant, documents (version, content hash, metadata, access list) and chunks
(text, heading path, offsets, MiniLM vector).

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
    op.create_table(
        "collections",
        sa.Column("pk", _ID, primary_key=True, autoincrement=True),
        sa.Column("uid", sa.String(32), nullable=False, unique=True),
        sa.Column("tenant", sa.String(256), nullable=False),
        sa.Column("collection_id", sa.String(63), nullable=False),
        sa.Column("display_name", sa.String(1024), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("embedding_model", sa.String(256), nullable=False),
        sa.Column("chunk_size", sa.Integer, nullable=False),
        sa.Column("chunk_overlap", sa.Integer, nullable=False),
        sa.Column("strategy", sa.Integer, nullable=False),
        sa.Column("etag", sa.String(64), nullable=False),
        sa.Column("create_request_id", sa.String(128), nullable=False),
        sa.Column("generation", sa.BigInteger, nullable=False),
        sa.Column("create_us", sa.BigInteger, nullable=False),
        sa.Column("update_us", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("tenant", "collection_id", name="uq_collections_tenant_id"),
    )
    op.create_table(
        "documents",
        sa.Column("collection_pk", _ID, sa.ForeignKey("collections.pk", ondelete="CASCADE"), primary_key=True),
        sa.Column("document_id", sa.String(63), primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("mime_type", sa.String(64), nullable=False),
        sa.Column("display_name", sa.String(1024), nullable=False),
        sa.Column("source_uri", sa.String(1024), nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("acl", sa.JSON, nullable=False),
        sa.Column("chunk_count", sa.Integer, nullable=False),
        sa.Column("create_us", sa.BigInteger, nullable=False),
        sa.Column("update_us", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "chunks",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("collection_pk", _ID, nullable=False),
        sa.Column("document_id", sa.String(63), nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("heading_path", sa.JSON, nullable=False),
        sa.Column("start_offset", sa.Integer, nullable=False),
        sa.Column("end_offset", sa.Integer, nullable=False),
        sa.Column("token_count", sa.Integer, nullable=False),
        sa.Column("embedding", sa.LargeBinary, nullable=False),
        sa.ForeignKeyConstraint(["collection_pk", "document_id"], ["documents.collection_pk", "documents.document_id"],
                                ondelete="CASCADE", name="fk_chunks_document"),
        sa.UniqueConstraint("collection_pk", "document_id", "idx", name="uq_chunks_position"),
    )


def downgrade() -> None:
    op.drop_table("chunks")
    op.drop_table("documents")
    op.drop_table("collections")
