"""One search, stage by stage, each stage timed into the response:

query understanding (expansion, HyDE) -> embed -> dense / sparse retrieval inside the access
filter -> fusion (or knowledge-graph traversal) -> fetch the rows (access re-checked on the rows)
-> rerank -> min_score -> top_k -> reorder -> compression -> `llmo.retrieval.v1.searched`.

Access control and metadata filters are applied inside every retriever before its top-k, and
again on the rows read at fetch time, so no later stage ever sees a chunk the caller may not read.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from llmo.core import context as ctx
from llmo.core.errors import failed_precondition, invalid_argument
from llmo.core.logging import get_logger
from llmo.core.outbox import Publisher
from llmo.embedding import Embedder
from llmo.protos.events.v1 import events_pb2
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.retrieval import postprocess, ranking
from llmo.retrieval import query as understanding
from llmo.retrieval.backends import FirstStage, FirstStageResult
from llmo.retrieval.backends.local import LocalFirstStage
from llmo.retrieval.convert import chunk_proto
from llmo.retrieval.generator import Generator
from llmo.retrieval.graph import GraphRetriever
from llmo.retrieval.indexes import CollectionIndex, IndexManager
from llmo.retrieval.rerank import Reranker, rerank_input
from llmo.retrieval.settings import RetrievalSettings
from llmo.retrieval.storage import ChunkRow, CollectionRow, DocumentRow, RetrievalStore

log = get_logger(__name__)

MAX_RERANK_CANDIDATES = 1000
MAX_HOPS = 3
ROW_CACHE_ENTRIES = 10_000  # chunks (text and document row); about 25 MB at 256-token chunks


class RowCache:
    """The rows `RetrievalStore.chunks_by_id` read, keyed by (collection uid, generation, chunk id).

    Every write that changes a chunk or its document (content, access list, metadata, names) bumps
    the collection's generation in its own transaction, and a search reads the generation before
    its rows, so rows kept under generation g were read at g or later: a search never gets rows
    older than the generation it read, and one after a write never meets the rows from before it.
    Rows are shared between searches: nothing downstream modifies them. Thread-safe; LRU."""

    def __init__(self, store: RetrievalStore, entries: int = ROW_CACHE_ENTRIES) -> None:
        self.store, self.entries = store, entries
        self._rows: OrderedDict[tuple[str, int, int], tuple[ChunkRow, DocumentRow]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0  # for tests and logs

    def rows(self, coll: CollectionRow, ids: Sequence[int]) -> dict[int, tuple[ChunkRow, DocumentRow]]:
        out: dict[int, tuple[ChunkRow, DocumentRow]] = {}
        missing: list[int] = []
        with self._lock:
            for chunk_id in ids:
                found = self._rows.get((coll.uid, coll.generation, chunk_id))
                if found is None:
                    missing.append(chunk_id)
                else:
                    self._rows.move_to_end((coll.uid, coll.generation, chunk_id))
                    out[chunk_id] = found
            self.hits += len(out)
            self.misses += len(missing)
        if not missing:
            return out
        read = self.store.chunks_by_id(coll.pk, missing)
        out.update(read)
        if self.entries:
            with self._lock:
                for chunk_id, row in read.items():
                    self._rows[(coll.uid, coll.generation, chunk_id)] = row
                while len(self._rows) > self.entries:
                    self._rows.popitem(last=False)
        return out


class StageLog:
    """The stages a search ran, in order, each with its latency."""

    def __init__(self) -> None:
        self.reports: list[pb.StageReport] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[pb.StageReport]:
        report = pb.StageReport(stage=name)
        started = time.perf_counter()
        try:
            yield report
        finally:
            report.latency_ms = (time.perf_counter() - started) * 1000
            self.reports.append(report)

    def fell_back(self, name: str, reason: str, latency_ms: float) -> None:
        self.reports.append(pb.StageReport(stage=name, latency_ms=latency_ms, fell_back=True, fallback_reason=reason))


class Searcher:
    def __init__(self, store: RetrievalStore, indexes: IndexManager, embedder: Embedder, settings: RetrievalSettings,
                 publisher: Publisher | None, *, generator: Generator | None = None, reranker: Reranker | None = None,
                 graph: GraphRetriever | None = None, first_stage: FirstStage | None = None) -> None:
        self.store, self.indexes, self.embedder, self.settings = store, indexes, embedder, settings
        self.publisher, self.generator, self.reranker = publisher, generator, reranker
        self.graph = graph or GraphRetriever(store)
        self.first_stage: FirstStage = first_stage or LocalFirstStage(indexes, embedder, settings)
        self.row_cache = RowCache(store)

    def check(self, request: pb.SearchRequest) -> None:
        """Every bound of the request, before any work (and before the collection is looked up)."""
        query = request.query
        if not query.strip():
            raise invalid_argument("EMPTY_QUERY", "query is empty")
        if len(query) > self.settings.max_query_chars:
            raise invalid_argument("QUERY_TOO_LONG", f"query is {len(query)} characters; the limit is "
                                   f"{self.settings.max_query_chars}", max_length=self.settings.max_query_chars)
        top_k = request.top_k or 10
        if not 1 <= top_k <= 100:
            raise invalid_argument("INVALID_TOP_K", "top_k must be in 1..100")
        mode = int(request.mode) or pb.SEARCH_MODE_HYBRID
        if mode not in (pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_SPARSE, pb.SEARCH_MODE_HYBRID,
                        pb.SEARCH_MODE_KNOWLEDGE_GRAPH):
            raise invalid_argument("INVALID_MODE", f"unknown search mode {mode}")
        if not math.isfinite(request.min_score):
            raise invalid_argument("INVALID_MIN_SCORE", "min_score must be finite")
        if request.rerank.candidates and not top_k <= request.rerank.candidates <= MAX_RERANK_CANDIDATES:
            raise invalid_argument("INVALID_STAGE_OPTIONS", f"rerank.candidates must be in top_k..{MAX_RERANK_CANDIDATES}",
                                   field="rerank.candidates")
        if not 0 <= request.knowledge_graph.max_hops <= MAX_HOPS:
            raise invalid_argument("INVALID_STAGE_OPTIONS", f"knowledge_graph.max_hops must be in 0..{MAX_HOPS}",
                                   field="knowledge_graph.max_hops")
        postprocess.check_options(request.compression.max_tokens)
        understanding.check_options(request, self.settings)
        # arguments first, then what this deployment can do
        if request.rerank.enabled and self.reranker is None:
            raise failed_precondition("RERANKER_UNAVAILABLE", "rerank.enabled: this service runs without a reranker "
                                      "(LLMO_RETRIEVAL_RERANKER is empty)", field="rerank.enabled")
        if request.rerank.enabled and not self.first_stage.supports_rerank:
            raise failed_precondition("RERANKER_UNAVAILABLE", "rerank.enabled: the reranker reads the local BM25 and "
                                      f"vector indexes, which LLMO_RETRIEVAL_BACKEND={self.first_stage.name} does not "
                                      "build", field="rerank.enabled")
        if (request.query_expansion.enabled or request.hyde.enabled) and self.generator is None:
            field_name = "query_expansion.enabled" if request.query_expansion.enabled else "hyde.enabled"
            raise failed_precondition("GENERATOR_UNAVAILABLE", f"{field_name}: this service runs without a generator "
                                      "(LLMO_RETRIEVAL_GENERATOR_URL and LLMO_ROUTER_HTTP_URL are empty)",
                                      field=field_name)

    async def search(self, request: pb.SearchRequest, coll: CollectionRow, principals: frozenset[str]) -> pb.SearchResponse:
        started = time.perf_counter()
        self.check(request)
        matches = ranking.compile_filters(request.filters)
        fusion = ranking.fusion_of(request.fusion)
        top_k = request.top_k or 10
        mode = int(request.mode) or pb.SEARCH_MODE_HYBRID
        stages = StageLog()
        plan = await understanding.plan_query(request, self.generator, self.settings, stages, tenant=coll.tenant)

        wanted = top_k
        if request.rerank.enabled:
            wanted = request.rerank.candidates or max(4 * top_k, 50)
        query_vector: np.ndarray | None = None
        index: CollectionIndex | None = None
        if mode == pb.SEARCH_MODE_KNOWLEDGE_GRAPH:
            considered, candidates = await self._graph_candidates(request, coll, principals, matches, wanted, stages)
        else:
            def first_stage() -> tuple[FirstStageResult, list[ranking.Candidate]]:  # one thread hop for both
                first = self.first_stage.run(coll, plan, principals, request.filters, matches, mode, fusion, wanted,
                                             stages.stage)
                return first, self._fetch(coll, first, principals, matches, stages)

            first, candidates = await asyncio.to_thread(first_stage)
            considered, query_vector, index = first.considered, first.query_vector, first.index

        if request.rerank.enabled and self.reranker is not None and candidates:
            candidates = await asyncio.to_thread(self._rerank, coll, index, plan.query, query_vector, candidates, stages)
        if request.min_score:
            with stages.stage("min_score") as report:
                candidates = [c for c in candidates if _final(c, request) >= request.min_score]
                report.items = len(candidates)
        candidates = candidates[:top_k]
        ranks = {id(c): rank for rank, c in enumerate(candidates, 1)}
        if request.reorder.enabled:
            with stages.stage("reorder") as report:
                candidates = postprocess.reorder_for_context(candidates)
                report.items = len(candidates)

        response = pb.SearchResponse(mode=mode, candidates_considered=considered,  # type: ignore[arg-type]
                                     expanded_queries=plan.expanded_queries,
                                     hypothetical_document=plan.hypothetical_document)
        response.usage.input_tokens, response.usage.output_tokens = plan.input_tokens, plan.output_tokens
        if request.rerank.enabled and self.reranker is not None:
            response.reranker_version = self.reranker.version
        compressed: list[str] = []
        if request.compression.enabled and candidates:
            if query_vector is None:
                query_vector = (await asyncio.to_thread(self.embedder.encode, [plan.query]))[0]
            with stages.stage("compression") as report:
                result = await asyncio.to_thread(postprocess.compress, query_vector, [c.chunk.text for c in candidates],
                                                 request.compression.max_tokens, self.embedder.encode)
                report.items = result.sentences_kept
            compressed = result.texts
            response.compressed_context = result.context
        for i, c in enumerate(candidates):
            document = f"collections/{coll.collection_id}/documents/{c.document.document_id}"
            response.results.append(pb.SearchResult(
                chunk=chunk_proto(document, c.document, c.chunk), score=_final(c, request),
                dense_score=c.fused.dense_score, sparse_score=c.fused.sparse_score, dense_rank=c.fused.dense_rank,
                sparse_rank=c.fused.sparse_rank, rerank_score=c.rerank_score,
                compressed_text=compressed[i] if compressed else "", matched_entities=c.matched_entities,
                relations=[pb.Relation(subject=s, predicate=p, object=o) for s, p, o in c.relations],
                rank=ranks[id(c)]))
        response.stages.extend(stages.reports)
        response.latency_ms = (time.perf_counter() - started) * 1000
        await self._publish(request, coll, response)
        return response

    # --- stages ------------------------------------------------------------------------------

    def _fetch(self, coll: CollectionRow, first: FirstStageResult, principals: frozenset[str],
               matches: ranking.Predicate, stages: StageLog) -> list[ranking.Candidate]:
        """The rows of the first stage's candidates (blocking)."""
        with stages.stage("fetch") as report:
            rows = self.row_cache.rows(coll, first.chunk_ids)
            out = []
            for item, chunk_id in zip(first.fused, first.chunk_ids, strict=True):
                found = rows.get(chunk_id)
                # the row read now, not the index, has the last word: a document replaced or re-permissioned
                # since the index was built is dropped rather than shown
                if found is None or not ranking.visible(found[1].acl, principals) or not matches(found[1].metadata):
                    continue
                out.append(ranking.Candidate(item, found[0], found[1]))
            report.items = len(out)
        return out

    async def _graph_candidates(self, request: pb.SearchRequest, coll: CollectionRow, principals: frozenset[str],
                                matches: ranking.Predicate, wanted: int, stages: StageLog
                                ) -> tuple[int, list[ranking.Candidate]]:
        with stages.stage("knowledge_graph") as report:
            hits = await asyncio.to_thread(self.graph.search, coll.pk, request.query, principals=principals,
                                           matches=matches, max_hops=request.knowledge_graph.max_hops or 1, k=wanted)
            report.items = len(hits)
        with stages.stage("fetch") as report:
            rows = await asyncio.to_thread(self.row_cache.rows, coll, [h.chunk_id for h in hits])
            out = []
            for rank, hit in enumerate(hits, 1):
                found = rows.get(hit.chunk_id)
                if found is None or not ranking.visible(found[1].acl, principals) or not matches(found[1].metadata):
                    continue
                out.append(ranking.Candidate(ranking.Fused(rank, hit.score), found[0], found[1],
                                             matched_entities=hit.matched_entities, relations=hit.relations))
            report.items = len(out)
        return len(out), out

    def _rerank(self, coll: CollectionRow, index: CollectionIndex | None, query: str, query_vector: np.ndarray | None,
                candidates: list[ranking.Candidate], stages: StageLog) -> list[ranking.Candidate]:
        """Re-scored by the reranker from the query and each candidate's text, stored vector and BM25
        score; `index` is the first stage's (None in KNOWLEDGE_GRAPH mode: the current one is used)."""
        assert self.reranker is not None
        with stages.stage("rerank") as report:
            if index is None:
                index = self.indexes.current(coll.pk, coll.uid)
            if query_vector is None:  # sparse and graph modes embedded nothing
                query_vector = self.embedder.encode([query])[0]
            scores = self.reranker.score(rerank_input(index, query, query_vector, candidates, self.embedder.encode))
            for c, s in zip(candidates, scores, strict=True):
                c.rerank_score = float(s)
            ordered = sorted(candidates, key=lambda c: (-c.rerank_score, -c.fused.score, c.chunk.id))
            report.items = len(ordered)
        return ordered

    async def _publish(self, request: pb.SearchRequest, coll: CollectionRow, response: pb.SearchResponse) -> None:
        if self.publisher is None or not self.settings.publish_search_events:
            return
        request_id = ctx.current_request_id() or ctx.new_request_id()
        event = events_pb2.RetrievalSearched(
            collection=f"collections/{coll.collection_id}", tenant=coll.tenant, mode=int(response.mode),
            top_k=request.top_k or 10, results=len(response.results), candidates_considered=response.candidates_considered,
            latency_ms=response.latency_ms, request_id=request_id,
            stages=[events_pb2.SearchStage(stage=s.stage, latency_ms=s.latency_ms, fell_back=s.fell_back,
                                           fallback_reason=s.fallback_reason) for s in response.stages])
        event.usage.CopyFrom(response.usage)
        event.attribution.CopyFrom(request.attribution)
        event.attribution.tenant = coll.tenant
        event.occurred_at.GetCurrentTime()
        try:
            await self.publisher.publish(event, event_id=f"retrieval-searched:{coll.uid}:{request_id}")
        except RuntimeError as error:  # stopping: the search already answered; the event is telemetry
            log.warning("searched event not written", collection=coll.collection_id, error=repr(error))


def _final(c: ranking.Candidate, request: pb.SearchRequest) -> float:
    return c.rerank_score if request.rerank.enabled and c.rerank_score else c.fused.score

