"""Knowledge graph: `collections.knowledge_graph_enabled` / `entity_extractor`, and per collection
the entities, their mentions in chunks and the relations stated by chunks.

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

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column("collections", sa.Column("knowledge_graph_enabled", sa.Boolean, nullable=False,
                                           server_default=sa.false()))
    op.add_column("collections", sa.Column("entity_extractor", sa.String(16), nullable=False, server_default=""))
    op.create_table(
        "graph_entities",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("collection_pk", _ID, sa.ForeignKey("collections.pk", ondelete="CASCADE"), nullable=False),
        sa.Column("key", sa.String(256), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.UniqueConstraint("collection_pk", "key", name="uq_graph_entities_key"),
    )
    op.create_table(
        "graph_mentions",
        sa.Column("entity_id", _ID, sa.ForeignKey("graph_entities.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("chunk_id", _ID, sa.ForeignKey("chunks.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("collection_pk", _ID, nullable=False),
        sa.Column("document_id", sa.String(63), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
    )
    op.create_index("ix_graph_mentions_chunk", "graph_mentions", ["chunk_id"])
    op.create_index("ix_graph_mentions_document", "graph_mentions", ["collection_pk", "document_id"])
    op.create_table(
        "graph_relations",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("collection_pk", _ID, nullable=False),
        sa.Column("document_id", sa.String(63), nullable=False),
        sa.Column("chunk_id", _ID, sa.ForeignKey("chunks.id", ondelete="CASCADE"), nullable=False),
        sa.Column("subject_id", _ID, sa.ForeignKey("graph_entities.id", ondelete="CASCADE"), nullable=False),
        sa.Column("predicate", sa.String(128), nullable=False),
        sa.Column("object_id", _ID, sa.ForeignKey("graph_entities.id", ondelete="CASCADE"), nullable=False),
        sa.UniqueConstraint("chunk_id", "subject_id", "predicate", "object_id", name="uq_graph_relations_fact"),
    )
    op.create_index("ix_graph_relations_subject", "graph_relations", ["subject_id"])
    op.create_index("ix_graph_relations_object", "graph_relations", ["object_id"])
    op.create_index("ix_graph_relations_document", "graph_relations", ["collection_pk", "document_id"])


def downgrade() -> None:
    op.drop_table("graph_relations")
    op.drop_table("graph_mentions")
    op.drop_table("graph_entities")
    with op.batch_alter_table("collections") as batch:  # SQLite rebuilds the table
        batch.drop_column("entity_extractor")
        batch.drop_column("knowledge_graph_enabled")
