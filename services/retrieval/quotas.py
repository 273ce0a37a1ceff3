"""Ingest quotas: `LLMO_RETRIEVAL_MAX_{DOCUMENTS,CHUNKS}_PER_{COLLECTION,TENANT}` (0: no limit, the default).

Writing a document is refused (`INGEST_QUOTA_EXCEEDED` in its progress; the stream goes on) when it
would raise a count past its limit. A new document adds one document and its chunks; a replacement
adds only the difference in chunks, so one that keeps or shrinks its size always goes through, even
over a limit lowered since. An update of metadata or the access list changes no count.

Checked twice: after chunking, before embedding (a refused document costs no embedding), and again in
the write transaction once the collection's write lock is held (and, with a per-tenant limit on
PostgreSQL, the tenant's advisory lock), so concurrent streams never overshoot a limit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.engine import Connection

from llmo.retrieval.settings import RetrievalSettings
from llmo.retrieval.storage import RetrievalStore, Usage


class QuotaExceeded(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Quotas:
    collection_documents: int = 0
    collection_chunks: int = 0
    tenant_documents: int = 0
    tenant_chunks: int = 0

    @classmethod
    def of(cls, settings: RetrievalSettings) -> Quotas:
        return cls(settings.max_documents_per_collection, settings.max_chunks_per_collection,
                   settings.max_documents_per_tenant, settings.max_chunks_per_tenant)

    @property
    def enabled(self) -> bool:
        return any((self.collection_documents, self.collection_chunks, self.tenant_documents, self.tenant_chunks))

    @property
    def per_tenant(self) -> bool:
        return bool(self.tenant_documents or self.tenant_chunks)

    def exceeded(self, usage: Usage, chunks: int) -> str | None:
        """Why writing a document of `chunks` chunks over `usage` (which counts everything but that
        document's current version) passes a limit, or None."""
        before_chunks = usage.document_chunks or 0
        adds_document = usage.document_chunks is None
        checks = (
            (self.collection_documents, usage.collection_documents, 1, 0, "documents", "collection",
             "LLMO_RETRIEVAL_MAX_DOCUMENTS_PER_COLLECTION"),
            (self.collection_chunks, usage.collection_chunks, chunks, before_chunks, "chunks", "collection",
             "LLMO_RETRIEVAL_MAX_CHUNKS_PER_COLLECTION"),
            (self.tenant_documents, usage.tenant_documents, 1, 0, "documents", "tenant",
             "LLMO_RETRIEVAL_MAX_DOCUMENTS_PER_TENANT"),
            (self.tenant_chunks, usage.tenant_chunks, chunks, before_chunks, "chunks", "tenant",
             "LLMO_RETRIEVAL_MAX_CHUNKS_PER_TENANT"),
        )
        for limit, others, after, before, what, scope, knob in checks:
            if what == "documents" and not adds_document:
                continue
            total = others + after
            if limit and total > limit and after > before:
                return f"the {scope} would hold {total} {what}; its quota is {limit} ({knob})"
        return None

    def check(self, store: RetrievalStore, tenant: str, collection_pk: int, document_id: str, chunks: int) -> str | None:
        """The check before embedding (blocking)."""
        if not self.enabled:
            return None
        return self.exceeded(store.usage(tenant, collection_pk, document_id, tenant_wide=self.per_tenant), chunks)

    def guard(self, store: RetrievalStore, tenant: str, collection_pk: int, document_id: str, chunks: int
              ) -> Callable[[Connection], None] | None:
        """The check inside `RetrievalStore.replace_document`'s transaction (raises QuotaExceeded)."""
        if not self.enabled:
            return None

        def check(conn: Connection) -> None:
            if self.per_tenant:
                store.lock_tenant(conn, tenant)
            problem = self.exceeded(store.usage(tenant, collection_pk, document_id, tenant_wide=self.per_tenant,
                                                conn=conn), chunks)
            if problem is not None:
                raise QuotaExceeded(problem)

        return check
