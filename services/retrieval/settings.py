"""Knobs of the retrieval service (`LLMO_RETRIEVAL_*`)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from llmo.core.settings import ServiceSettings, platform_fallback


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
    max_documents_per_collection: int = Field(default=0, ge=0)
    """Ingest quota: most documents one collection may hold (0: no limit). A new document past it
    fails with INGEST_QUOTA_EXCEEDED in its progress and the stream goes on; replacing a document
    counts only the difference."""
    max_chunks_per_collection: int = Field(default=0, ge=0)
    """Ingest quota: most chunks one collection may hold, over all its documents (0: no limit)."""
    max_documents_per_tenant: int = Field(default=0, ge=0)
    """Ingest quota: most documents one tenant may hold over all its collections (0: no limit)."""
    max_chunks_per_tenant: int = Field(default=0, ge=0)
    """Ingest quota: most chunks one tenant may hold over all its collections (0: no limit)."""
    max_query_chars: int = 4096
    """Longest search query accepted."""
    backend: str = "local"
    """Where the dense and sparse first stage runs: "local" (each replica builds its own BM25 and
    FAISS indexes from the database, in memory) or "pgvector" (inside PostgreSQL with the pgvector
    extension, shared by every replica and current at once; needs a PostgreSQL `database_url`).
    Any other value stops the service at start."""
    overfetch: int = 4
    """Each retriever fetches `overfetch * top_k` candidates (at least `min_candidates`) before fusion."""
    min_candidates: int = 50
    """Fewest candidates each retriever fetches before fusion."""
    reranker: str = "builtin"
    """Second-stage reranker artifact: "builtin" (the LambdaRank model committed with the service),
    a directory written by `python -m llmo.retrieval.rerank.train`, or empty for none (then
    `rerank.enabled` fails with FAILED_PRECONDITION RERANKER_UNAVAILABLE). An artifact that cannot
    be loaded stops the service at start."""
    generator_url: str = Field(default="", json_schema_extra=platform_fallback("router_http_url"))
    """OpenAI-compatible base URL of the generator that writes query paraphrases, standalone
    queries from chat history and HyDE documents (`/v1` is appended when missing). Unset: the
    router's (`LLMO_ROUTER_HTTP_URL`, set by `llmo up`); empty everywhere: no generator, and
    `query_expansion` / `hyde` fail with FAILED_PRECONDITION GENERATOR_UNAVAILABLE."""
    generator_api_key: str = ""
    """Bearer key of this service at the generator. At the router it should be an admin tenant's
    key: the service sends the searching tenant in `x-llmo-tenant`, so the router charges the
    generation to that tenant, not to retrieval."""
    generator_model: str = "auto"
    """Model asked when a request names none (`auto`: the router chooses)."""
    generator_timeout_s: float = 8.0
    """Deadline of one generator call (never past the search's own deadline); past it the search
    goes on with the plain query and the stage reports GENERATOR_TIMEOUT."""
    generator_max_tokens: int = 256
    """Most tokens the generator may write per call."""
    graph_extractor_model: str = ""
    """Model the "llm" entity extractor of knowledge-graph collections asks, through the generator
    endpoint (empty: `generator_model`)."""
    graph_extractor_timeout_s: float = Field(default=20.0, gt=0)
    """Deadline of one chunk's extraction call (never past the ingest stream's own deadline); past
    it, or on an answer that is not the JSON asked for, the chunk's graph comes from the local
    extractor and the fallback is counted."""
    graph_extractor_document_timeout_s: float = Field(default=120.0, gt=0)
    """Time all the extraction calls of one document may take together; chunks not extracted by
    then fall back to the local extractor."""
    graph_extractor_concurrency: int = Field(default=4, ge=1, le=64)
    """Extraction calls in flight per document."""
    graph_extractor_max_tokens: int = Field(default=1024, ge=64)
    """Most tokens the generator may write per chunk's extraction."""
    embed_batch_size: int = 32
    """Chunks per MiniLM forward pass at ingestion."""
    embed_precision: Literal["auto", "fp32", "bf16"] = "auto"
    """MiniLM precision for chunk and query embeddings: "auto" is bf16 on CPUs with native bf16
    (AVX512-BF16, AMX; about 2x faster, cosine >= 0.9999 to fp32), fp32 elsewhere."""
    bm25_k1: float = 1.2
    """BM25 term-frequency saturation (Lucene variant, bm25s)."""
    bm25_b: float = 0.75
    """BM25 length normalisation (Lucene variant, bm25s)."""
    cached_collections: int = 64
    """Collections whose indexes stay loaded in memory (least recently searched are dropped)."""
    hnsw_min_chunks: int = 25_000
    """Collections with at least this many chunks get an HNSW dense index (below: exact IndexFlatIP,
    whose search time grows linearly with the chunks; `llmo bench retrieval --areas memory` measures
    both)."""
    hnsw_m: int = 32
    """HNSW graph degree (M)."""
    hnsw_ef_construction: int = 100
    """HNSW candidate list while building (efConstruction)."""
    hnsw_ef_search: int = 64
    """HNSW candidate list while searching (efSearch; raised to k when k is larger)."""
    hnsw_exact_below: int = 4096
    """With HNSW, an access/filter-allowed subset of at most this many chunks is searched exactly
    instead of through the graph (a selective filter would starve the graph walk)."""
    index_rebuild_tombstone_share: float = Field(default=0.2, ge=0.0, le=1.0)
    """A changed document's old chunks stay in the local dense index as tombstones (masked out of
    every search); once they are more than this share of its chunks, the next change rebuilds the
    index from the live chunks (also when the live count crosses `hnsw_min_chunks`)."""

    def resolved_index_dir(self) -> Path:
        return Path(self.index_dir) if self.index_dir else self.platform.data_dir / "retrieval" / "indexes"
