"""Knobs of the retrieval service (`LLMO_RETRIEVAL_*`)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from llmo.core.settings import ServiceSettings


class RetrievalSettings(ServiceSettings):
    service: ClassVar[str] = "retrieval"

    publish_events: bool = True
    """Publish `llmo.retrieval.v1.document_ingested` through the outbox (needs NATS eventually, not to start)."""
    publish_search_events: bool = True
    """Also publish `llmo.retrieval.v1.searched` (per-stage latency) for every search (with `publish_events`)."""
    index_dir: str = ""
    """Where the BM25 and FAISS indexes are persisted, one folder per collection; empty:
    `<data_dir>/retrieval/indexes`. Indexes are derived data: deleted or stale ones are rebuilt
    from the database."""
    max_document_bytes: int = 8 * 1024 * 1024
    """Largest document accepted (raw bytes or UTF-8 text); past it the document fails with DOCUMENT_TOO_LARGE."""
    max_chunks_per_document: int = 4096
    """Most chunks one document may produce; past it the document fails with DOCUMENT_TOO_LARGE."""
    max_query_chars: int = 4096
    """Longest search query accepted."""
    overfetch: int = 4
    """Each retriever fetches `overfetch * top_k` candidates (at least `min_candidates`) before fusion."""
    min_candidates: int = 50
    """Fewest candidates each retriever fetches before fusion."""
    embed_batch_size: int = 32
    """Chunks per MiniLM forward pass at ingestion."""
    bm25_k1: float = 1.2
    """BM25 term-frequency saturation (Lucene variant, bm25s)."""
    bm25_b: float = 0.75
    """BM25 length normalisation (Lucene variant, bm25s)."""
    cached_collections: int = 64
    """Collections whose indexes stay loaded in memory (least recently searched are dropped)."""

    def resolved_index_dir(self) -> Path:
        return Path(self.index_dir) if self.index_dir else self.platform.data_dir / "retrieval" / "indexes"
