"""Store of record of the retrieval service (SQLAlchemy 2 Core; SQLite or PostgreSQL).

Collections belong to a tenant; documents to a collection; chunks (text, heading path,
offsets and the MiniLM vector) to a document. The BM25 and FAISS indexes are derived
from these rows (llmo.retrieval.indexes): every write that changes what a search may
return bumps the collection's `generation` in the same transaction and records in
`index_changes` which document it changed; an index at an older generation is stale and
applies the documents changed since (or is rebuilt when that record is gone).

A document is replaced in one transaction (old row and chunks deleted, new ones
inserted), so a reader or a crash mid-ingest sees the old document or the new one,
never half of one. Every method blocks; callers run them off the event loop.

Knowledge graph (collections with `knowledge_graph_enabled`): `graph_entities` (one row per
normalised name per collection), `graph_mentions` (entity <-> chunk, with the name as that
document writes it) and `graph_relations` (subject, predicate, object, and the chunk stating
it). They are written in the transaction that writes the document's chunks and deleted
explicitly with them (replace, delete, collection delete); an entity no chunk mentions any
more is deleted in the same transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from llmo.core import storage as core_storage

MIGRATIONS = Path(__file__).parent / "migrations"

metadata = sa.MetaData()
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only

collections = sa.Table(
    "collections",
    metadata,
    sa.Column("pk", _ID, primary_key=True, autoincrement=True),
    # Never reused (a primary key may be, after a delete): names the collection's index folder.
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
    sa.Column("knowledge_graph_enabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("entity_extractor", sa.String(16), nullable=False, server_default=""),
    sa.UniqueConstraint("tenant", "collection_id", name="uq_collections_tenant_id"),
)

documents = sa.Table(
    "documents",
    metadata,
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

chunks = sa.Table(
    "chunks",
    metadata,
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

graph_entities = sa.Table(
    "graph_entities",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("collection_pk", _ID, sa.ForeignKey("collections.pk", ondelete="CASCADE"), nullable=False),
    sa.Column("key", sa.String(256), nullable=False),
    sa.Column("name", sa.String(256), nullable=False),
    sa.UniqueConstraint("collection_pk", "key", name="uq_graph_entities_key"),
)

graph_mentions = sa.Table(
    "graph_mentions",
    metadata,
    sa.Column("entity_id", _ID, sa.ForeignKey("graph_entities.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("chunk_id", _ID, sa.ForeignKey("chunks.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("collection_pk", _ID, nullable=False),
    sa.Column("document_id", sa.String(63), nullable=False),
    sa.Column("name", sa.String(256), nullable=False),
    sa.Index("ix_graph_mentions_chunk", "chunk_id"),
    sa.Index("ix_graph_mentions_document", "collection_pk", "document_id"),
)

graph_relations = sa.Table(
    "graph_relations",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("collection_pk", _ID, nullable=False),
    sa.Column("document_id", sa.String(63), nullable=False),
    sa.Column("chunk_id", _ID, sa.ForeignKey("chunks.id", ondelete="CASCADE"), nullable=False),
    sa.Column("subject_id", _ID, sa.ForeignKey("graph_entities.id", ondelete="CASCADE"), nullable=False),
    sa.Column("predicate", sa.String(128), nullable=False),
    sa.Column("object_id", _ID, sa.ForeignKey("graph_entities.id", ondelete="CASCADE"), nullable=False),
    sa.UniqueConstraint("chunk_id", "subject_id", "predicate", "object_id", name="uq_graph_relations_fact"),
    sa.Index("ix_graph_relations_subject", "subject_id"),
    sa.Index("ix_graph_relations_object", "object_id"),
    sa.Index("ix_graph_relations_document", "collection_pk", "document_id"),
)

# Which document each generation changed: `content` when its chunks changed (replaced or deleted),
# not when only its access list / metadata did. Written by `_bump` in the writing transaction; an
# index at generation g applies the rows after g (llmo.retrieval.indexes). Rows older than
# INDEX_CHANGES_KEPT generations are pruned: an index that far behind is rebuilt instead.
index_changes = sa.Table(
    "index_changes",
    metadata,
    sa.Column("collection_pk", _ID, sa.ForeignKey("collections.pk", ondelete="CASCADE"), primary_key=True),
    sa.Column("generation", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("document_id", sa.String(63), nullable=False),
    sa.Column("content", sa.Boolean, nullable=False),
)

INDEX_CHANGES_KEPT = 10_000
_IN_BATCH = 500  # values per IN (...) list
_TENANT_QUOTA_LOCK = 0x6C6C6D71  # advisory lock space (first key) of the per-tenant quota lock


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass
class CollectionRow:
    pk: int
    uid: str
    tenant: str
    collection_id: str
    display_name: str
    description: str
    labels: dict[str, str]
    embedding_model: str
    chunk_size: int
    chunk_overlap: int
    strategy: int
    etag: str
    create_request_id: str
    generation: int
    create_us: int
    update_us: int
    document_count: int = 0
    chunk_count: int = 0
    knowledge_graph_enabled: bool = False
    entity_extractor: str = ""


@dataclass
class ChunkGraph:
    """What one chunk says for the knowledge graph: the entities it mentions (key -> name as the
    document writes it) and the relations it states, (subject key, predicate, object key), both
    keys among its entities."""

    entities: dict[str, str] = field(default_factory=dict)
    relations: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class MentionRow:
    entity_id: int
    chunk_id: int
    document_id: str
    name: str


@dataclass(frozen=True)
class RelationRow:
    id: int
    chunk_id: int
    document_id: str
    subject_id: int
    predicate: str
    object_id: int


@dataclass
class ChunkRow:
    idx: int
    text: str
    heading_path: list[str]
    start_offset: int
    end_offset: int
    token_count: int
    embedding: bytes = b""
    id: int = 0
    graph: ChunkGraph | None = None  # written with the chunk when set (knowledge-graph collections)


@dataclass
class DocumentRow:
    document_id: str
    content_sha256: str
    size_bytes: int
    mime_type: str
    display_name: str
    source_uri: str
    metadata: dict[str, Any]
    acl: list[str]
    version: int = 0
    chunk_count: int = 0
    create_us: int = 0
    update_us: int = 0
    chunks: list[ChunkRow] = field(default_factory=list)


@dataclass(frozen=True)
class IndexedChunk:
    """What an index holds about one chunk: enough to rank it and to apply access control and filters."""

    id: int
    document_id: str
    text: str
    embedding: bytes
    acl: tuple[str, ...]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class IndexChanges:
    """What changed in a collection between two generations, as an index applies it: the documents
    whose chunks changed lose their old chunks and get `chunks` (their current ones, by id; none
    when deleted); `access` holds the current (access list, metadata) of every changed document
    that still exists."""

    since: int
    generation: int
    content: frozenset[str]
    chunks: list[IndexedChunk]
    access: dict[str, tuple[tuple[str, ...], dict[str, Any]]]


@dataclass(frozen=True)
class Usage:
    """What a collection and its tenant (all its collections) hold, for ingest quotas, not counting
    one document (the one being written); `document_chunks` is that document's current chunk
    count, None when it does not exist."""

    collection_documents: int
    collection_chunks: int
    tenant_documents: int
    tenant_chunks: int
    document_chunks: int | None


class AlreadyExists(Exception):
    pass


class EtagMismatch(Exception):
    pass


class NotEmpty(Exception):
    pass


class VersionMismatch(Exception):
    pass


class _NoWrite(Exception):
    """Rolls back a transaction that found nothing to write; carries what to answer."""

    def __init__(self, doc: DocumentRow | None) -> None:
        self.doc = doc


_COLLECTION_FIELDS = [c for c in collections.columns]


def _collection(row: Any, document_count: int = 0, chunk_count: int = 0) -> CollectionRow:
    values = {c.name: row._mapping[c.name] for c in _COLLECTION_FIELDS}
    return CollectionRow(**values, document_count=document_count, chunk_count=chunk_count)


def _document(row: Any) -> DocumentRow:
    m = row._mapping
    return DocumentRow(document_id=m["document_id"], content_sha256=m["content_sha256"], size_bytes=m["size_bytes"],
                       mime_type=m["mime_type"], display_name=m["display_name"], source_uri=m["source_uri"],
                       metadata=dict(m["metadata"] or {}), acl=list(m["acl"] or []), version=m["version"],
                       chunk_count=m["chunk_count"], create_us=m["create_us"], update_us=m["update_us"])


class RetrievalStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Called inside replace_document's transaction once a document's chunks are inserted (the
        # pgvector backend writes its search rows there: llmo.retrieval.backends.pgvector).
        self.on_chunks_written: Callable[[Connection, int, DocumentRow], None] | None = None

    @classmethod
    def open(cls, url: str) -> RetrievalStore:
        engine = core_storage.create_engine(url)
        core_storage.migrate(engine, MIGRATIONS)
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    # --- collections ---------------------------------------------------------------------------

    def create_collection(self, row: CollectionRow) -> CollectionRow:
        """Insert; an existing id raises AlreadyExists unless `create_request_id` matches (a retry)."""
        values = {c.name: getattr(row, c.name) for c in _COLLECTION_FIELDS if c.name != "pk"}
        try:
            with self.engine.begin() as conn:
                key = conn.execute(collections.insert().values(**values)).inserted_primary_key
                assert key is not None
                row.pk = int(key[0])
                return row
        except sa.exc.IntegrityError:
            existing = self.get_collection(row.tenant, row.collection_id)
            if existing is not None and row.create_request_id and existing.create_request_id == row.create_request_id:
                return existing
            raise AlreadyExists(row.collection_id) from None

    def _counts(self, conn: Connection, pks: Sequence[int]) -> dict[int, tuple[int, int]]:
        if not pks:
            return {}
        q = sa.select(documents.c.collection_pk, sa.func.count(), sa.func.coalesce(sa.func.sum(documents.c.chunk_count), 0)
                      ).where(documents.c.collection_pk.in_(pks)).group_by(documents.c.collection_pk)
        return {int(pk): (int(d), int(c)) for pk, d, c in conn.execute(q)}

    def get_collection(self, tenant: str, collection_id: str, *, counts: bool = True) -> CollectionRow | None:
        """The collection; without `counts` its document and chunk counts are left 0 (they are a
        scan of its documents, which a search does not need)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(collections).where(
                collections.c.tenant == tenant, collections.c.collection_id == collection_id)).first()
            if row is None:
                return None
            if not counts:
                return _collection(row)
            return _collection(row, *self._counts(conn, [row.pk]).get(row.pk, (0, 0)))

    def list_collections(self, tenant: str, after: str, limit: int) -> list[CollectionRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(collections).where(
                collections.c.tenant == tenant, collections.c.collection_id > after
            ).order_by(collections.c.collection_id).limit(limit)).all()
            counts = self._counts(conn, [r.pk for r in rows])
            return [_collection(r, *counts.get(r.pk, (0, 0))) for r in rows]

    def update_collection(self, tenant: str, collection_id: str, changes: dict[str, Any], etag: str,
                          new_etag: str, *, needs_empty: bool) -> CollectionRow | None:
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(collections).where(
                collections.c.tenant == tenant, collections.c.collection_id == collection_id).with_for_update()).first()
            if row is None:
                return None
            if etag and etag != row.etag:
                raise EtagMismatch(collection_id)
            documents_held = self._counts(conn, [row.pk]).get(row.pk, (0, 0))[0]
            if needs_empty and documents_held:
                raise NotEmpty(collection_id)
            conn.execute(collections.update().where(collections.c.pk == row.pk).values(
                **changes, etag=new_etag, update_us=now_us()))
        return self.get_collection(tenant, collection_id)

    def delete_collection(self, tenant: str, collection_id: str, *, force: bool, etag: str) -> CollectionRow | None:
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(collections).where(
                collections.c.tenant == tenant, collections.c.collection_id == collection_id).with_for_update()).first()
            if row is None:
                return None
            if etag and etag != row.etag:
                raise EtagMismatch(collection_id)
            if not force and self._counts(conn, [row.pk]).get(row.pk, (0, 0))[0]:
                raise NotEmpty(collection_id)
            conn.execute(graph_relations.delete().where(graph_relations.c.collection_pk == row.pk))
            conn.execute(graph_mentions.delete().where(graph_mentions.c.collection_pk == row.pk))
            conn.execute(graph_entities.delete().where(graph_entities.c.collection_pk == row.pk))
            conn.execute(chunks.delete().where(chunks.c.collection_pk == row.pk))
            conn.execute(documents.delete().where(documents.c.collection_pk == row.pk))
            conn.execute(collections.delete().where(collections.c.pk == row.pk))
            return _collection(row)

    def generation(self, collection_pk: int) -> int | None:
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(collections.c.generation).where(collections.c.pk == collection_pk)).scalar()
            return None if value is None else int(value)

    # --- documents ---------------------------------------------------------------------------

    def get_document(self, collection_pk: int, document_id: str, *, with_chunks: bool = False) -> DocumentRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(documents).where(
                documents.c.collection_pk == collection_pk, documents.c.document_id == document_id)).first()
            if row is None:
                return None
            doc = _document(row)
            if with_chunks:
                doc.chunks = [ChunkRow(idx=r.idx, text=r.text, heading_path=list(r.heading_path or []),
                                       start_offset=r.start_offset, end_offset=r.end_offset,
                                       token_count=r.token_count, id=r.id)
                              for r in conn.execute(sa.select(
                                  chunks.c.id, chunks.c.idx, chunks.c.text, chunks.c.heading_path,
                                  chunks.c.start_offset, chunks.c.end_offset, chunks.c.token_count).where(
                                  chunks.c.collection_pk == collection_pk, chunks.c.document_id == document_id
                              ).order_by(chunks.c.idx))]
            return doc

    def iter_documents(self, collection_pk: int, after: str, batch: int = 500) -> Iterator[DocumentRow]:
        """Documents ordered by id, after `after`, read in batches (ListDocuments filters them)."""
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(sa.select(documents).where(
                    documents.c.collection_pk == collection_pk, documents.c.document_id > after
                ).order_by(documents.c.document_id).limit(batch)).all()
            for row in rows:
                yield _document(row)
            if len(rows) < batch:
                return
            after = rows[-1].document_id

    def replace_document(self, collection_pk: int, doc: DocumentRow,
                         check: Callable[[Connection], None] | None = None) -> int | None:
        """Write `doc`, its chunks and their graph (`ChunkRow.graph`) in place of any earlier version,
        in one transaction; the new version, or None when the collection is gone. `check` runs once
        the collection's write lock is held, before anything is written; what it raises rolls back."""
        with self.engine.begin() as conn:
            if not self._bump(conn, collection_pk, doc.document_id):
                return None
            if check is not None:
                check(conn)
            old = conn.execute(sa.select(documents.c.version, documents.c.create_us).where(
                documents.c.collection_pk == collection_pk, documents.c.document_id == doc.document_id)).first()
            stamp = now_us()
            doc.version = (old.version + 1) if old else 1
            doc.create_us = old.create_us if old else stamp
            doc.update_us = stamp
            doc.chunk_count = len(doc.chunks)
            self._delete_document(conn, collection_pk, doc.document_id)
            conn.execute(documents.insert().values(
                collection_pk=collection_pk, document_id=doc.document_id, version=doc.version,
                content_sha256=doc.content_sha256, size_bytes=doc.size_bytes, mime_type=doc.mime_type,
                display_name=doc.display_name, source_uri=doc.source_uri, metadata=doc.metadata, acl=doc.acl,
                chunk_count=doc.chunk_count, create_us=doc.create_us, update_us=doc.update_us))
            if doc.chunks:
                conn.execute(chunks.insert(), [dict(
                    collection_pk=collection_pk, document_id=doc.document_id, idx=c.idx, text=c.text,
                    heading_path=c.heading_path, start_offset=c.start_offset, end_offset=c.end_offset,
                    token_count=c.token_count, embedding=c.embedding) for c in doc.chunks])
                if self.on_chunks_written is not None:
                    self.on_chunks_written(conn, collection_pk, doc)
            if any(c.graph for c in doc.chunks):
                ids = {int(idx): int(cid) for idx, cid in conn.execute(sa.select(chunks.c.idx, chunks.c.id).where(
                    chunks.c.collection_pk == collection_pk, chunks.c.document_id == doc.document_id))}
                self._write_graph(conn, collection_pk, doc.document_id,
                                  [(ids[c.idx], c.graph) for c in doc.chunks if c.graph])
            return doc.version

    @staticmethod
    def _write_graph(conn: Connection, collection_pk: int, document_id: str,
                     graphs: Sequence[tuple[int, ChunkGraph]]) -> None:
        names: dict[str, str] = {}
        for _, graph in graphs:
            for key, name in graph.entities.items():
                names.setdefault(key, name)
        keys = sorted(names)
        ids: dict[str, int] = {}
        for start in range(0, len(keys), _IN_BATCH):
            batch = keys[start:start + _IN_BATCH]
            ids.update((k, int(i)) for k, i in conn.execute(sa.select(graph_entities.c.key, graph_entities.c.id).where(
                graph_entities.c.collection_pk == collection_pk, graph_entities.c.key.in_(batch))))
        missing = [k for k in keys if k not in ids]
        if missing:  # writers of one collection are serialised by `_bump`'s row lock
            conn.execute(graph_entities.insert(), [dict(collection_pk=collection_pk, key=k, name=names[k])
                                                   for k in missing])
            for start in range(0, len(missing), _IN_BATCH):
                ids.update((k, int(i)) for k, i in conn.execute(sa.select(graph_entities.c.key, graph_entities.c.id).where(
                    graph_entities.c.collection_pk == collection_pk,
                    graph_entities.c.key.in_(missing[start:start + _IN_BATCH]))))
        mention_rows, relation_rows = [], []
        for chunk_id, graph in graphs:
            mention_rows += [dict(entity_id=ids[key], chunk_id=chunk_id, collection_pk=collection_pk,
                                  document_id=document_id, name=name) for key, name in graph.entities.items()]
            for subject, predicate, obj in dict.fromkeys(graph.relations):
                if subject not in graph.entities or obj not in graph.entities:
                    raise ValueError(f"relation ({subject!r}, {predicate!r}, {obj!r}) names an entity its chunk "
                                     "does not mention")
                relation_rows.append(dict(collection_pk=collection_pk, document_id=document_id, chunk_id=chunk_id,
                                          subject_id=ids[subject], predicate=predicate, object_id=ids[obj]))
        if mention_rows:
            conn.execute(graph_mentions.insert(), mention_rows)
        if relation_rows:
            conn.execute(graph_relations.insert(), relation_rows)

    def update_document_fields(self, collection_pk: int, doc: DocumentRow) -> int | None:
        """Same content, new metadata / access list / names: no re-chunking; the new version."""
        with self.engine.begin() as conn:
            if not self._bump(conn, collection_pk, doc.document_id, content=False):
                return None
            version = conn.execute(sa.select(documents.c.version).where(
                documents.c.collection_pk == collection_pk, documents.c.document_id == doc.document_id)).scalar()
            if version is None:
                return None
            doc.version = int(version) + 1
            conn.execute(documents.update().where(
                documents.c.collection_pk == collection_pk, documents.c.document_id == doc.document_id
            ).values(version=doc.version, display_name=doc.display_name, source_uri=doc.source_uri,
                     metadata=doc.metadata, acl=doc.acl, mime_type=doc.mime_type, update_us=now_us()))
            return doc.version

    def update_document_access(self, collection_pk: int, document_id: str, acl: list[str], expected_version: int = 0
                               ) -> tuple[DocumentRow | None, bool]:
        """Replace a document's access list only (content, chunks, graph and metadata kept): a new
        version and a bump that names the document (`content=False`), so every index applies the new
        list at its next search. One transaction that takes the collection's write lock first, so a
        concurrent ingest is never overwritten. (document, changed): (None, False) when there is no
        such document; an unchanged list writes nothing. VersionMismatch when `expected_version` is
        set and is not the current version."""
        try:
            with self.engine.begin() as conn:
                if not self._bump(conn, collection_pk, document_id, content=False):
                    raise _NoWrite(None)
                row = conn.execute(sa.select(documents).where(
                    documents.c.collection_pk == collection_pk, documents.c.document_id == document_id)).first()
                if row is None:
                    raise _NoWrite(None)
                doc = _document(row)
                if expected_version and doc.version != expected_version:
                    raise VersionMismatch(document_id)
                if doc.acl == acl:
                    raise _NoWrite(doc)
                doc.acl, doc.version, doc.update_us = list(acl), doc.version + 1, now_us()
                conn.execute(documents.update().where(
                    documents.c.collection_pk == collection_pk, documents.c.document_id == document_id
                ).values(acl=doc.acl, version=doc.version, update_us=doc.update_us))
                return doc, True
        except _NoWrite as nothing:
            return nothing.doc, False

    def delete_document(self, collection_pk: int, document_id: str) -> bool:
        with self.engine.begin() as conn:
            exists = conn.execute(sa.select(documents.c.version).where(
                documents.c.collection_pk == collection_pk, documents.c.document_id == document_id)).first()
            if exists is None:
                return False
            self._bump(conn, collection_pk, document_id)
            self._delete_document(conn, collection_pk, document_id)
            return True

    @staticmethod
    def _delete_document(conn: Connection, collection_pk: int, document_id: str) -> None:
        """The document, its chunks and its graph rows; entities left without any mention go too."""
        touched = conn.execute(sa.select(graph_mentions.c.entity_id).distinct().where(
            graph_mentions.c.collection_pk == collection_pk, graph_mentions.c.document_id == document_id)
        ).scalars().all()
        conn.execute(graph_relations.delete().where(
            graph_relations.c.collection_pk == collection_pk, graph_relations.c.document_id == document_id))
        conn.execute(graph_mentions.delete().where(
            graph_mentions.c.collection_pk == collection_pk, graph_mentions.c.document_id == document_id))
        for start in range(0, len(touched), _IN_BATCH):
            still_mentioned = sa.select(graph_mentions.c.entity_id).where(
                graph_mentions.c.entity_id == graph_entities.c.id).exists()
            conn.execute(graph_entities.delete().where(
                graph_entities.c.id.in_(list(touched[start:start + _IN_BATCH])), ~still_mentioned))
        conn.execute(chunks.delete().where(chunks.c.collection_pk == collection_pk, chunks.c.document_id == document_id))
        conn.execute(documents.delete().where(
            documents.c.collection_pk == collection_pk, documents.c.document_id == document_id))

    @staticmethod
    def _bump(conn: Connection, collection_pk: int, document_id: str | None = None, *, content: bool = True) -> bool:
        """Mark the collection's indexes stale (and lock its row until commit on PostgreSQL), and
        record in `index_changes` which document the new generation changed (`content`: its chunks,
        else only its access list / metadata). A bump naming no document makes indexes rebuild."""
        result = conn.execute(collections.update().where(collections.c.pk == collection_pk).values(
            generation=collections.c.generation + 1))
        if not result.rowcount:
            return False
        if document_id is not None:
            current = sa.select(collections.c.generation).where(collections.c.pk == collection_pk).scalar_subquery()
            conn.execute(index_changes.insert().from_select(
                ["collection_pk", "generation", "document_id", "content"],
                sa.select(collections.c.pk, collections.c.generation, sa.literal(document_id, sa.String),
                          sa.literal(content, sa.Boolean)).where(collections.c.pk == collection_pk)))
            conn.execute(index_changes.delete().where(
                index_changes.c.collection_pk == collection_pk,
                index_changes.c.generation <= current - INDEX_CHANGES_KEPT))
        return True

    # --- ingest quotas (llmo.retrieval.quotas) -----------------------------------------------

    def usage(self, tenant: str, collection_pk: int, document_id: str, *, tenant_wide: bool,
              conn: Connection | None = None) -> Usage:
        """Documents and chunks of the collection and (with `tenant_wide`; else 0) of the tenant, not
        counting `document_id`, read in `conn`'s transaction when given."""
        if conn is None:
            with self.engine.connect() as own:
                return self.usage(tenant, collection_pk, document_id, tenant_wide=tenant_wide, conn=own)
        totals = sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(documents.c.chunk_count), 0))
        this = sa.and_(documents.c.collection_pk == collection_pk, documents.c.document_id == document_id)
        c_docs, c_chunks = conn.execute(totals.where(documents.c.collection_pk == collection_pk, ~this)).one()
        t_docs, t_chunks = 0, 0
        if tenant_wide:
            t_docs, t_chunks = conn.execute(totals.select_from(documents.join(
                collections, collections.c.pk == documents.c.collection_pk)).where(
                collections.c.tenant == tenant, ~this)).one()
        current = conn.execute(sa.select(documents.c.chunk_count).where(this)).scalar()
        return Usage(int(c_docs), int(c_chunks), int(t_docs), int(t_chunks), None if current is None else int(current))

    @staticmethod
    def lock_tenant(conn: Connection, tenant: str) -> None:
        """Serialise the quota-checked writes of one tenant across its collections until commit
        (PostgreSQL advisory lock; SQLite serialises every write already)."""
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:space, hashtext(:tenant))"),
                         {"space": _TENANT_QUOTA_LOCK, "tenant": tenant})

    # --- what the indexes are built from -------------------------------------------------------

    def indexed_chunks(self, collection_pk: int) -> tuple[int, list[IndexedChunk]]:
        """(generation, every chunk) read in one transaction, so the two agree."""
        with self.engine.connect() as conn, conn.begin():
            generation = conn.execute(sa.select(collections.c.generation).where(
                collections.c.pk == collection_pk)).scalar()
            rows = conn.execute(sa.select(
                chunks.c.id, chunks.c.document_id, chunks.c.text, chunks.c.embedding, documents.c.acl,
                documents.c.metadata).join(documents, sa.and_(
                    documents.c.collection_pk == chunks.c.collection_pk,
                    documents.c.document_id == chunks.c.document_id)).where(
                chunks.c.collection_pk == collection_pk).order_by(chunks.c.id)).all()
        return int(generation or 0), [IndexedChunk(r.id, r.document_id, r.text, bytes(r.embedding),
                                                   tuple(r.acl or ()), dict(r.metadata or {})) for r in rows]

    def index_changes(self, collection_pk: int, since: int) -> IndexChanges | None:
        """What changed after generation `since`, read in one transaction; None when that is not
        known (the collection is gone, `since` is ahead, or a generation in between has no
        `index_changes` row: pruned, or bumped without naming a document), then rebuild."""
        with self.engine.connect() as conn, conn.begin():
            generation = conn.execute(sa.select(collections.c.generation).where(
                collections.c.pk == collection_pk)).scalar()
            if generation is None or int(generation) < since:
                return None
            rows = conn.execute(sa.select(index_changes.c.document_id, index_changes.c.content).where(
                index_changes.c.collection_pk == collection_pk, index_changes.c.generation > since,
                index_changes.c.generation <= generation)).all()
            if len(rows) != int(generation) - since:
                return None
            content = sorted({r.document_id for r in rows if r.content})
            changed = sorted({r.document_id for r in rows})
            found: list[IndexedChunk] = []
            for start in range(0, len(content), _IN_BATCH):
                found += [IndexedChunk(r.id, r.document_id, r.text, bytes(r.embedding), tuple(r.acl or ()),
                                       dict(r.metadata or {})) for r in conn.execute(sa.select(
                    chunks.c.id, chunks.c.document_id, chunks.c.text, chunks.c.embedding, documents.c.acl,
                    documents.c.metadata).join(documents, sa.and_(
                        documents.c.collection_pk == chunks.c.collection_pk,
                        documents.c.document_id == chunks.c.document_id)).where(
                    chunks.c.collection_pk == collection_pk,
                    chunks.c.document_id.in_(content[start:start + _IN_BATCH])))]
            access: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {}
            for start in range(0, len(changed), _IN_BATCH):
                for r in conn.execute(sa.select(documents.c.document_id, documents.c.acl, documents.c.metadata).where(
                        documents.c.collection_pk == collection_pk,
                        documents.c.document_id.in_(changed[start:start + _IN_BATCH]))):
                    access[r.document_id] = (tuple(r.acl or ()), dict(r.metadata or {}))
        found.sort(key=lambda c: c.id)
        return IndexChanges(since, int(generation), frozenset(content), found, access)

    def chunks_by_id(self, collection_pk: int, ids: Sequence[int]) -> dict[int, tuple[ChunkRow, DocumentRow]]:
        if not ids:
            return {}
        with self.engine.connect() as conn:
            wanted = [c for c in chunks.c if c.name != "embedding"]  # the vectors are the index's business
            # by primary key only: with `collection_pk = ?` in the WHERE, SQLite walks the collection's
            # (collection_pk, document_id, idx) index, every chunk of it, instead of looking the ids up
            rows = conn.execute(sa.select(*wanted, documents).join(documents, sa.and_(
                documents.c.collection_pk == chunks.c.collection_pk,
                documents.c.document_id == chunks.c.document_id)).where(chunks.c.id.in_(list(ids)))).all()
        out: dict[int, tuple[ChunkRow, DocumentRow]] = {}
        for r in rows:
            m = r._mapping
            if m[chunks.c.collection_pk] != collection_pk:
                continue
            out[int(m[chunks.c.id])] = (
                ChunkRow(idx=m[chunks.c.idx], text=m[chunks.c.text], heading_path=list(m[chunks.c.heading_path] or []),
                         start_offset=m[chunks.c.start_offset], end_offset=m[chunks.c.end_offset],
                         token_count=m[chunks.c.token_count], id=int(m[chunks.c.id])),
                DocumentRow(document_id=m[documents.c.document_id], content_sha256=m[documents.c.content_sha256],
                            size_bytes=m[documents.c.size_bytes], mime_type=m[documents.c.mime_type],
                            display_name=m[documents.c.display_name], source_uri=m[documents.c.source_uri],
                            metadata=dict(m[documents.c.metadata] or {}), acl=list(m[documents.c.acl] or []),
                            version=m[documents.c.version]))
        return out

    # --- knowledge graph (read by llmo.retrieval.graph) ---------------------------------------

    def graph_enabled(self, collection_pk: int) -> bool | None:
        """Whether the collection extracts a knowledge graph (None: no such collection)."""
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(collections.c.knowledge_graph_enabled).where(
                collections.c.pk == collection_pk)).scalar()
            return None if value is None else bool(value)

    def entities_by_key(self, collection_pk: int, keys: Sequence[str]) -> dict[str, int]:
        """Entity id of each of `keys` the collection knows."""
        unique = sorted(set(keys))
        out: dict[str, int] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(unique), _IN_BATCH):
                out.update((k, int(i)) for k, i in conn.execute(sa.select(graph_entities.c.key, graph_entities.c.id).where(
                    graph_entities.c.collection_pk == collection_pk,
                    graph_entities.c.key.in_(unique[start:start + _IN_BATCH]))))
        return out

    def relations_touching(self, collection_pk: int, entity_ids: Sequence[int]) -> list[RelationRow]:
        """Relations with `entity_ids` as subject or object, ordered by id."""
        unique = sorted(set(entity_ids))
        found: dict[int, RelationRow] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(unique), _IN_BATCH):
                batch = unique[start:start + _IN_BATCH]
                for r in conn.execute(sa.select(
                        graph_relations.c.id, graph_relations.c.chunk_id, graph_relations.c.document_id,
                        graph_relations.c.subject_id, graph_relations.c.predicate, graph_relations.c.object_id).where(
                        graph_relations.c.collection_pk == collection_pk,
                        sa.or_(graph_relations.c.subject_id.in_(batch), graph_relations.c.object_id.in_(batch)))):
                    found[int(r.id)] = RelationRow(int(r.id), int(r.chunk_id), r.document_id, int(r.subject_id),
                                                   r.predicate, int(r.object_id))
        return [found[i] for i in sorted(found)]

    def mentions_of(self, collection_pk: int, entity_ids: Sequence[int]) -> list[MentionRow]:
        """Every mention of `entity_ids`, ordered by chunk then entity."""
        unique = sorted(set(entity_ids))
        out: list[MentionRow] = []
        with self.engine.connect() as conn:
            for start in range(0, len(unique), _IN_BATCH):
                out += [MentionRow(int(r.entity_id), int(r.chunk_id), r.document_id, r.name) for r in conn.execute(
                    sa.select(graph_mentions.c.entity_id, graph_mentions.c.chunk_id, graph_mentions.c.document_id,
                              graph_mentions.c.name).where(
                        graph_mentions.c.collection_pk == collection_pk,
                        graph_mentions.c.entity_id.in_(unique[start:start + _IN_BATCH])))]
        return sorted(out, key=lambda m: (m.chunk_id, m.entity_id))

    def document_access(self, collection_pk: int, document_ids: Sequence[str]) -> dict[str, tuple[list[str], dict[str, Any]]]:
        """(access list, metadata) of each of `document_ids` that exists."""
        unique = sorted(set(document_ids))
        out: dict[str, tuple[list[str], dict[str, Any]]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(unique), _IN_BATCH):
                for r in conn.execute(sa.select(documents.c.document_id, documents.c.acl, documents.c.metadata).where(
                        documents.c.collection_pk == collection_pk,
                        documents.c.document_id.in_(unique[start:start + _IN_BATCH]))):
                    out[r.document_id] = (list(r.acl or []), dict(r.metadata or {}))
        return out

    def graph_counts(self, collection_pk: int) -> tuple[int, int, int]:
        """(entities, mentions, relations) rows of the collection."""
        with self.engine.connect() as conn:
            return tuple(int(conn.execute(sa.select(sa.func.count()).select_from(t).where(
                t.c.collection_pk == collection_pk)).scalar() or 0)
                for t in (graph_entities, graph_mentions, graph_relations))  # type: ignore[return-value]
