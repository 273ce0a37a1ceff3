"""The pgvector first stage (`LLMO_RETRIEVAL_BACKEND=pgvector`): dense and sparse retrieval inside
PostgreSQL, so every replica searches one shared index and a write is visible to the next search.

Schema (migration 0003, or `ensure_schema` at start): `chunk_vectors`, one row per chunk (its id,
collection, document, MiniLM vector as `vector(384)` and `to_tsvector('english', text)`), with an
HNSW index (`vector_ip_ops`: inner product over L2-normalised vectors = cosine), a GIN index over
the terms and a (collection, document) index. Rows are written by `write_chunks` inside the
transaction that writes the document's chunks (`RetrievalStore.on_chunks_written`) and go with
them (`ON DELETE CASCADE`) on re-ingest, document delete and collection delete. Access lists and
metadata are read from `documents` at query time, so a metadata/access-list-only update needs no
write here.

Search: one REPEATABLE READ transaction (one snapshot) per first stage. Access control (the
document's access list against the caller's principals, as `ranking.visible`) and the metadata
filters are SQL conditions of every query, applied before LIMIT. Filters SQL cannot express with
the predicate's exact semantics (ordered comparisons of strings: SQL orders by collation; keys
with a numeric part: jsonb paths index arrays) are decided in Python on the candidate documents
first, and the query is restricted to the documents kept.

- Dense: `ORDER BY embedding <#> query` over the HNSW index with `hnsw.ef_search =
  max(LLMO_RETRIEVAL_HNSW_EF_SEARCH, k)` (at most 1000). pgvector filters after the graph walk,
  so a walk that yields fewer than k rows (a selective filter, or a small collection of a large
  table) is redone exactly (index scans off); an allowed set of at most
  `LLMO_RETRIEVAL_HNSW_EXACT_BELOW` chunks is searched exactly from the start.
- Sparse: PostgreSQL full-text ranking, NOT BM25: the query's lexemes (`plainto_tsquery
  ('english')`, Snowball stemmer and stop words) OR-ed, chunks matching at least one, ranked by
  `ts_rank_cd(terms, query, 1)` (cover density, divided by 1 + log(length)). Scores are not
  comparable with the local backend's BM25 scores; the fused ranking and RRF are the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from llmo.core import storage as core_storage
from llmo.core.logging import get_logger
from llmo.embedding import EMBEDDING_DIM, Embedder
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.retrieval import candidates, ranking
from llmo.retrieval.backends import FirstStageResult, fetch_size
from llmo.retrieval.candidates import Stage
from llmo.retrieval.indexes import Hit
from llmo.retrieval.query import QueryPlan
from llmo.retrieval.settings import RetrievalSettings
from llmo.retrieval.storage import CollectionRow, DocumentRow, RetrievalStore

log = get_logger(__name__)

TEXT_SEARCH_CONFIG = "english"
MAX_EF_SEARCH = 1000  # pgvector's bound on hnsw.ef_search
_SCHEMA_LOCK = 0x6C6C6D6F7067  # advisory lock: replicas starting together create the schema once
_BACKFILL_BATCH = 500

# Idempotent and additive only (run by migration 0003 and again at start): anything else needs a new migration.
SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS chunk_vectors (
        chunk_id BIGINT PRIMARY KEY REFERENCES chunks (id) ON DELETE CASCADE,
        collection_pk BIGINT NOT NULL,
        document_id VARCHAR(63) NOT NULL,
        embedding vector({EMBEDDING_DIM}) NOT NULL,
        terms tsvector NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS ix_chunk_vectors_embedding ON chunk_vectors USING hnsw (embedding vector_ip_ops)",
    "CREATE INDEX IF NOT EXISTS ix_chunk_vectors_terms ON chunk_vectors USING gin (terms)",
    "CREATE INDEX IF NOT EXISTS ix_chunk_vectors_document ON chunk_vectors (collection_pk, document_id)",
)

_COLUMNS = "chunk_id, collection_pk, document_id, embedding, terms"
_VALUES = f"c.id, c.collection_pk, c.document_id, CAST(:embedding AS vector), to_tsvector('{TEXT_SEARCH_CONFIG}', c.text)"
_INSERT_DOCUMENT_CHUNK = sa.text(f"INSERT INTO chunk_vectors ({_COLUMNS}) SELECT {_VALUES} FROM chunks c "
                                 "WHERE c.collection_pk = :pk AND c.document_id = :document AND c.idx = :idx")
_INSERT_CHUNK = sa.text(f"INSERT INTO chunk_vectors ({_COLUMNS}) SELECT {_VALUES} FROM chunks c WHERE c.id = :id "
                        "ON CONFLICT (chunk_id) DO NOTHING")
_FROM = ("FROM chunk_vectors v JOIN documents d ON d.collection_pk = v.collection_pk AND d.document_id = v.document_id "
         "WHERE v.collection_pk = :pk")


def vector_literal(embedding: bytes | np.ndarray) -> str:
    """pgvector's text form of a float32 vector (9 significant digits: exact for float32)."""
    values = np.frombuffer(embedding, dtype=np.float32) if isinstance(embedding, bytes) else embedding
    return "[" + ",".join(f"{x:.9g}" for x in np.asarray(values, dtype=np.float32).tolist()) + "]"


# --- schema and writes ----------------------------------------------------------------------


def has_extension(conn: Connection) -> bool:
    return conn.execute(sa.text("SELECT 1 FROM pg_extension WHERE extname = 'vector'")).first() is not None


def create_schema(conn: Connection) -> None:
    for statement in SCHEMA:
        conn.exec_driver_sql(statement)


def create_extension(url: str) -> None:
    """`CREATE EXTENSION vector` unless the database has it (then no privilege is needed); before the
    migrations run, so migration 0003 creates the tables. Raises RuntimeError with the fix."""
    engine = core_storage.create_engine(url, pool_size=1, max_overflow=0)
    try:
        with engine.begin() as conn:
            if has_extension(conn):
                return
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
            conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS vector")
    except sa.exc.DBAPIError as error:
        where = engine.url.render_as_string(hide_password=True)
        raise RuntimeError(f"LLMO_RETRIEVAL_BACKEND=pgvector: the database {where} has no pgvector extension and "
                           f"`CREATE EXTENSION vector` failed ({str(error.orig).strip()}). Install pgvector on the "
                           "PostgreSQL server, then run `CREATE EXTENSION vector` in this database as a role "
                           "allowed to (or start with that role once).") from None
    finally:
        engine.dispose()


def ensure_schema(engine: Engine) -> int:
    """The tables (a database migrated past 0003 before pgvector was installed lacks them) and a
    row for every chunk without one (chunks written while the backend was `local`); returns how
    many rows were added."""
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
        if conn.execute(sa.text("SELECT to_regclass('chunk_vectors')")).scalar() is None:
            create_schema(conn)
    added = 0
    while True:
        with engine.begin() as conn:
            rows = conn.execute(sa.text(
                "SELECT c.id, c.embedding FROM chunks c WHERE NOT EXISTS "
                "(SELECT 1 FROM chunk_vectors v WHERE v.chunk_id = c.id) ORDER BY c.id LIMIT :n"),
                {"n": _BACKFILL_BATCH}).all()
            if not rows:
                return added
            conn.execute(_INSERT_CHUNK, [dict(id=int(r.id), embedding=vector_literal(bytes(r.embedding)))
                                         for r in rows])
            added += len(rows)


def write_chunks(conn: Connection, collection_pk: int, doc: DocumentRow) -> None:
    """The search rows of a document's chunks, just inserted in `conn`'s transaction (RetrievalStore.on_chunks_written)."""
    if doc.chunks:
        conn.execute(_INSERT_DOCUMENT_CHUNK, [dict(pk=collection_pk, document=doc.document_id, idx=c.idx,
                                                   embedding=vector_literal(c.embedding)) for c in doc.chunks])


# --- access control and filters as SQL ------------------------------------------------------

_NUMERIC_PART = re.compile(r"-?\d+")
_ORDERED_SQL = {ranking.LT: "<", ranking.LTE: "<=", ranking.GT: ">", ranking.GTE: ">="}


@dataclass(frozen=True)
class Scope:
    """The chunks one search may return: SQL conditions over `d` (documents) and their parameters."""

    where: str
    params: dict[str, Any]
    considered: int


def _scalar(value: Any) -> Any:
    kind = value.WhichOneof("kind")
    return {"number_value": value.number_value, "string_value": value.string_value,
            "bool_value": value.bool_value}[kind]


def filter_sql(flt: Any, name: str, params: dict[str, Any]) -> str | None:
    """One filter as a condition over `d.metadata` with exactly `ranking.compile_filters`' semantics,
    or None when SQL cannot say it exactly (the caller decides it in Python)."""
    parts = flt.key.split(".")
    if any(_NUMERIC_PART.fullmatch(p) for p in parts):  # `#>` would index into arrays; the predicate does not
        return None
    op = int(flt.operator)
    params[f"{name}_path"] = parts
    field = f"(d.metadata::jsonb #> CAST(:{name}_path AS text[]))"  # NULL when missing
    if op == ranking.EXISTS:
        return f"{field} IS NOT NULL"
    # a list matches when any element does; a missing field reads as [null], which equals no value
    items = (f"jsonb_array_elements(CASE WHEN jsonb_typeof({field}) = 'array' THEN {field} "
             f"ELSE jsonb_build_array({field}) END) AS e(v)")
    values = [_scalar(v) for v in flt.values]
    if op in _ORDERED_SQL:
        if not isinstance(values[0], float):
            return None  # strings: SQL compares by collation, Python by code point
        params[f"{name}_number"] = values[0]
        return (f"EXISTS (SELECT 1 FROM {items} WHERE jsonb_typeof(e.v) = 'number' "
                f"AND (e.v)::numeric {_ORDERED_SQL[op]} :{name}_number)")
    params[f"{name}_values"] = json.dumps(values)
    hit = f"EXISTS (SELECT 1 FROM {items} WHERE e.v IN (SELECT jsonb_array_elements(CAST(:{name}_values AS jsonb))))"
    return f"NOT {hit}" if op in (ranking.NOT_EQUAL, ranking.NOT_IN) else hit


def scope(conn: Connection, collection_pk: int, principals: frozenset[str], filters: Sequence[Any],
          matches: ranking.Predicate) -> Scope:
    params: dict[str, Any] = {"pk": collection_pk}
    clauses = ["d.collection_pk = :pk"]
    if principals:
        clauses.append("(json_array_length(d.acl) = 0 OR d.acl::jsonb ?| CAST(:principals AS text[]))")
        params["principals"] = sorted(principals)
    else:
        clauses.append("json_array_length(d.acl) = 0")
    translated = [filter_sql(f, f"f{i}", params) for i, f in enumerate(filters)]
    clauses += [c for c in translated if c is not None]
    where = " AND ".join(clauses)
    if all(c is not None for c in translated):
        considered = conn.execute(sa.text(f"SELECT coalesce(sum(d.chunk_count), 0) FROM documents d WHERE {where}"),
                                  params).scalar()
        return Scope(where, params, int(considered or 0))
    rows = conn.execute(sa.text(f"SELECT d.document_id, d.metadata, d.chunk_count FROM documents d WHERE {where}"),
                        params).all()
    kept = [r for r in rows if matches(dict(r.metadata or {}))]
    params["documents"] = [r.document_id for r in kept]
    return Scope(f"{where} AND d.document_id = ANY(:documents)", params, sum(int(r.chunk_count) for r in kept))


# --- the retrievers -------------------------------------------------------------------------


class _Retrievers:
    """`candidates.Retrievers` over one transaction; hits carry chunk ids as positions."""

    def __init__(self, conn: Connection, ef_search: int, exact_below: int) -> None:
        self.conn, self.ef_search, self.exact_below = conn, ef_search, exact_below

    def dense_search(self, vector: np.ndarray, allowed: Scope, k: int) -> list[Hit]:
        k = min(k, allowed.considered)
        if k <= 0:
            return []
        exact = allowed.considered <= self.exact_below
        hits = self._dense(vector, allowed, k, exact=exact)
        if not exact and len(hits) < k:  # the graph walk ran out of allowed rows: exact over the allowed set
            hits = self._dense(vector, allowed, k, exact=True)
        return hits

    def _dense(self, vector: np.ndarray, allowed: Scope, k: int, *, exact: bool) -> list[Hit]:
        self.conn.execute(sa.text("SELECT set_config('hnsw.ef_search', :ef, true), "
                                  "set_config('enable_indexscan', :scan, true)"),
                          {"ef": str(min(max(self.ef_search, k), MAX_EF_SEARCH)), "scan": "off" if exact else "on"})
        rows = self.conn.execute(sa.text(
            f"SELECT v.chunk_id, v.embedding <#> CAST(:query AS vector) AS distance {_FROM} AND {allowed.where} "
            "ORDER BY v.embedding <#> CAST(:query AS vector) LIMIT :k"),
            {**allowed.params, "query": vector_literal(vector), "k": k}).all()
        hits = [Hit(int(r.chunk_id), -float(r.distance)) for r in rows]
        return sorted(hits, key=lambda h: (-h.score, h.position))

    def sparse(self, query: str, allowed: Scope, k: int) -> list[Hit]:
        if k <= 0 or allowed.considered == 0:
            return []
        rows = self.conn.execute(sa.text(
            f"SELECT v.chunk_id, ts_rank_cd(v.terms, q.query, 1) AS score "
            f"FROM (SELECT replace(plainto_tsquery('{TEXT_SEARCH_CONFIG}', :text)::text, ' & ', ' | ')::tsquery "
            f"AS query) q CROSS JOIN chunk_vectors v JOIN documents d ON d.collection_pk = v.collection_pk "
            f"AND d.document_id = v.document_id WHERE v.collection_pk = :pk AND {allowed.where} "
            "AND v.terms @@ q.query ORDER BY score DESC, v.chunk_id LIMIT :k"),
            {**allowed.params, "text": query, "k": k}).all()
        return [Hit(int(r.chunk_id), float(r.score)) for r in rows if r.score > 0]


class PgvectorFirstStage:
    name = "pgvector"
    supports_rerank = False  # the reranker's features read BM25 scores over the whole collection

    def __init__(self, engine: Engine, embedder: Embedder, settings: RetrievalSettings) -> None:
        self.engine, self.embedder, self.settings = engine, embedder, settings

    @classmethod
    def open(cls, store: RetrievalStore, embedder: Embedder, settings: RetrievalSettings) -> PgvectorFirstStage:
        """Check the schema, add rows for chunks without one and hook the store's writes (blocking)."""
        added = ensure_schema(store.engine)
        if added:
            log.info("pgvector rows added for existing chunks", chunks=added)
        store.on_chunks_written = write_chunks
        return cls(store.engine, embedder, settings)

    def run(self, coll: CollectionRow, plan: QueryPlan, principals: frozenset[str], filters: Sequence[Any],
            matches: ranking.Predicate, mode: int, fusion: ranking.Fusion, wanted: int, stage: Stage
            ) -> FirstStageResult:
        with self.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
            with stage("index") as report:
                allowed = scope(conn, coll.pk, principals, filters, matches)
                report.items = allowed.considered
            vectors = None
            if mode in (pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_HYBRID) and allowed.considered:
                with stage("embed") as report:
                    vectors = candidates.variant_vectors(plan, self.embedder.encode)
                    report.items = len(vectors)
            fetch = fetch_size(mode, wanted, self.settings.overfetch, self.settings.min_candidates)
            retrievers = _Retrievers(conn, self.settings.hnsw_ef_search, self.settings.hnsw_exact_below)
            fused = candidates.retrieve(retrievers, plan, allowed, mode=mode, fusion=fusion, fetch=fetch,
                                        vectors=vectors, stage=stage) if allowed.considered else []
        fused = fused[:wanted]
        return FirstStageResult(allowed.considered, fused, [f.position for f in fused],
                                vectors[0] if vectors else None, None)
