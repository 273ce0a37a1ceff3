"""`llmo bench retrieval`: the retrieval service against the libraries a user would use instead.

Four areas (`--areas`, all by default), measured side by side in one run on the same machine:

- quality: nDCG@10 and recall@100 on SciFact (BEIR layout, the 809 judged train claims: only
  qrels/train.tsv is here) and CISI (SMART files), for the service's modes sparse, dense, hybrid
  (RRF), hybrid (convex fusion) and hybrid + rerank, through the real service (in-process, IngestDocuments and Search over
  gRPC, `llmo.retrieval.rerank.harness`). Rerank on SciFact is k-fold cross-validated (no query is
  scored by a model trained on it); on CISI the builtin artifact (trained on SciFact train only)
  when it exists, and cross-validation on CISI as well. The plain peers: bm25s directly (same
  k1 / b / stop words / stemmer as the service) and FAISS IndexFlatIP over MiniLM vectors of whole
  documents, and their RRF; the service chunks documents and fuses per chunk. The peer a user would
  pick instead: LangChain's EnsembleRetriever over BM25Retriever (rank_bm25) + a FAISS vectorstore,
  on the same MiniLM vectors (handed over as .npy files), run as a subprocess of
  .peers/retrieval-langchain (scripts/peers_retrieval.sh; skipped without it and under --smoke).
  `goals` checks hybrid >= the better single retriever + 0.02 and hybrid + rerank >= hybrid + 0.02.
- speed: search latency p50/p99 and queries/s of the service per mode over gRPC, against bm25s and
  FAISS called directly on the same collection, and LangChain's EnsembleRetriever; ingest throughput (docs/s, chunks/s) with the
  MiniLM vectors memoised (the service's own work) and with real embedding, against the direct
  pipeline (MiniLM encode + bm25s index + FAISS add).
- bm25: bm25s against tantivy (installed by scripts/peers_retrieval.sh into .peers/retrieval and run
  as a subprocess of that venv; bm25s runs as a subprocess too, so both are measured alike): index
  build time, query p50/p99, nDCG@10 / recall@100, memory, on the same documents and queries.
- memory: bytes held by the BM25, FAISS flat and HNSW indexes per 10k chunks (the SciFact chunks,
  built with `CollectionIndex.build`); for the pgvector backend the bytes of its tables and indexes
  (pg_total_relation_size) after ingesting a SciFact subset into a pgserver PostgreSQL (skipped
  when pgserver cannot start), per 10k chunks; and HNSW vs flat latency and recall@10 at 10k / 50k / 100k
  vectors (random unit vectors, and the real chunk vectors resampled with noise).

MiniLM vectors are memoised under `--cache` (default `.llmo/bench-retrieval-cache`): the first run
embeds SciFact (minutes on two cores), later runs read the vectors back. Progress goes to stderr;
the result is one JSON object. `--smoke` runs every area on a generated tiny collection in well
under a minute (what the test runs); `--quick` takes a subset of the queries.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bm25s
import faiss
import grpc
import numpy as np
import sqlalchemy as sa
import Stemmer

from llmo.core.logging import configure_logging
from llmo.embedding import EMBEDDING_DIM, EMBEDDING_MODEL, text_key
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.protos.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc
from llmo.retrieval.indexes import BM25_METHOD, STEMMER_LANGUAGE, STOPWORDS, CollectionIndex, DenseConfig
from llmo.retrieval.rerank import BUILTIN_DIR, ArtifactError, LearnedReranker, harness
from llmo.retrieval.rerank import data as judged
from llmo.retrieval.rerank.crossval import crossval_session, ndcg_at
from llmo.retrieval.rerank.model import fit
from llmo.retrieval.settings import RetrievalSettings

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_CACHE = ROOT / ".llmo" / "bench-retrieval-cache"
DEFAULT_TANTIVY_PYTHON = ROOT / ".peers" / "retrieval" / "bin" / "python"
DEFAULT_LANGCHAIN_PYTHON = ROOT / ".peers" / "retrieval-langchain" / "bin" / "python"
LANGCHAIN_PEER = Path(__file__).resolve().parent / "peers" / "langchain_hybrid.py"
GOAL_MARGIN = 0.02  # nDCG@10 points: hybrid over the better single retriever, rerank over hybrid
AREAS = ("quality", "speed", "bm25", "memory")
DATASETS = {"scifact": "retrieval/scifact", "cisi": "retrieval/cisi"}
SPLIT = "train"  # SciFact: the only qrels here; CISI has one set of judgements whatever the split
MODES = {"sparse": pb.SEARCH_MODE_SPARSE, "dense": pb.SEARCH_MODE_DENSE, "hybrid": pb.SEARCH_MODE_HYBRID}
QUALITY_TOP_K = 100  # chunks per search for nDCG@10 / recall@100 (the service's top_k limit)
LATENCY_TOP_K = 10
RRF_K = 60
K1 = float(RetrievalSettings.model_fields["bm25_k1"].default)
B = float(RetrievalSettings.model_fields["bm25_b"].default)
OVERFETCH = int(RetrievalSettings.model_fields["overfetch"].default)
MIN_CANDIDATES = int(RetrievalSettings.model_fields["min_candidates"].default)
JITTER_SIGMA = 0.02

ANCHORS: dict[str, Any] = {
    "scifact_test_ndcg10": {
        "bm25": {"value": 0.665, "source": "BEIR paper (Thakur et al., NeurIPS 2021 Datasets and Benchmarks), "
                 "Table 2: BM25 (Elasticsearch), SciFact test"},
        "all_minilm_l6_v2": {"value": 0.645, "source": "published all-MiniLM-L6-v2 result on BEIR SciFact test "
                             "(MTEB retrieval, nDCG@10), as cited in issue 14"},
    },
    "note": "the published figures are on SciFact's 300 test claims with whole documents; ours are on the 809 train "
            "claims (only qrels/train.tsv is here), so they are comparable in kind, not number for number",
}


def log(message: str) -> None:
    print(f"[bench retrieval] {message}", file=sys.stderr, flush=True)


# --- measures ---------------------------------------------------------------------------------


def recall_at(ranking: Sequence[str], relevant: dict[str, int], k: int = 100) -> float:
    return len(set(ranking[:k]) & set(relevant)) / len(relevant) if relevant else 0.0


def quality_of(rankings: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    qids = sorted(rankings)
    return {"ndcg10": round(float(np.mean([ndcg_at(rankings[q], qrels[q], 10) for q in qids])), 4),
            "recall100": round(float(np.mean([recall_at(rankings[q], qrels[q], 100) for q in qids])), 4),
            "queries": len(qids)}


def latency_of(samples_s: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3), "qps": round(len(ms) / float(np.sum(samples_s)), 1),
            "n": len(ms)}


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return round(a / b, digits) if a is not None and b else None


def rss_bytes() -> int:
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    return {"cpu": model or "unknown", "cores": os.cpu_count(), "arch": os.uname().machine,
            "faiss_threads": faiss.omp_get_max_threads()}


def body(title: str, text: str) -> str:
    """A document's text as the harness ingests it."""
    return f"{title}\n\n{text}" if title and text else (title or text)


def documents(dataset: judged.Dataset) -> tuple[list[str], list[str]]:
    """(ids, texts) of the documents the harness ingests, in its order."""
    ids, texts = [], []
    for raw, (title, text) in sorted(dataset.corpus.items()):
        if body(title, text).strip():
            ids.append(raw)
            texts.append(body(title, text))
    return ids, texts


def subset(dataset: judged.Dataset, n: int | None, seed: int = 0) -> judged.Dataset:
    """The dataset with `n` of its queries (a seeded choice; all of them when n is None)."""
    qids = sorted(dataset.queries)
    if n is not None and n < len(qids):
        qids = sorted(random.Random(seed).sample(qids, n))
    return judged.Dataset(dataset.name, dataset.corpus, {q: dataset.queries[q] for q in qids},
                          {q: dataset.qrels[q] for q in qids})


# --- the direct peers: bm25s and FAISS on whole documents -------------------------------------


class Direct:
    """bm25s (the service's k1, b, stop words and stemmer) and FAISS IndexFlatIP, called directly."""

    def __init__(self, ids: list[str], texts: list[str], vectors: np.ndarray) -> None:
        self.ids = ids
        self.stemmer = Stemmer.Stemmer(STEMMER_LANGUAGE)
        started = time.perf_counter()
        tokens = bm25s.tokenize(texts, lower=True, stopwords=STOPWORDS, stemmer=self.stemmer, show_progress=False)
        self.bm25 = bm25s.BM25(k1=K1, b=B, method=BM25_METHOD)
        self.bm25.index(tokens, show_progress=False)
        self.bm25_build_s = time.perf_counter() - started
        started = time.perf_counter()
        self.flat = faiss.IndexFlatIP(EMBEDDING_DIM)
        self.flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.faiss_build_s = time.perf_counter() - started

    def sparse(self, query: str, k: int) -> list[int]:
        tokens = bm25s.tokenize([query], lower=True, stopwords=STOPWORDS, stemmer=self.stemmer, show_progress=False)
        docs, scores = self.bm25.retrieve(tokens, k=min(k, len(self.ids)), show_progress=False, n_threads=1)
        return [int(d) for d, s in zip(docs[0], scores[0], strict=True) if s > 0]

    def dense(self, vector: np.ndarray, k: int) -> list[int]:
        _, positions = self.flat.search(vector.reshape(1, -1), min(k, len(self.ids)))
        return [int(p) for p in positions[0] if p >= 0]

    def hybrid(self, query: str, vector: np.ndarray, k: int) -> list[int]:
        """RRF (k = 60) of both lists, each fetched with the service's over-fetch."""
        fetch = max(OVERFETCH * k, MIN_CANDIDATES)
        fused: dict[int, float] = {}
        for hits in (self.dense(vector, fetch), self.sparse(query, fetch)):
            for rank, position in enumerate(hits, 1):
                fused[position] = fused.get(position, 0.0) + 1.0 / (RRF_K + rank)
        return sorted(fused, key=lambda p: (-fused[p], p))[:k]

    def named(self, positions: list[int]) -> list[str]:
        return [self.ids[p] for p in positions]


def doc_vectors(live: harness.MemoEncoder, texts: list[str], cache: Path | None, name: str) -> np.ndarray:
    """MiniLM vectors of whole documents: from the service's memo when a document is one chunk of the
    same text, else embedded (memoised in `<cache>/<name>-docs-minilm.npz`)."""
    keys = [text_key(t) for t in texts]
    missing = [t for t, k in zip(texts, keys, strict=True) if k not in live.known]
    own = harness.MemoEncoder(live.inner, cache / f"{name}-docs-minilm.npz" if cache is not None else None)
    if missing:
        unknown = sum(text_key(t) not in own.known for t in missing)
        if unknown:
            log(f"{name}: embedding {unknown} whole documents for the FAISS peer (first run only)")
        own.encode(missing)
        own.save()
    return np.stack([live.known[k] if k in live.known else own.known[k] for k in keys]).astype(np.float32)


# --- the service over gRPC ----------------------------------------------------------------------


async def search(current: harness.Session, query: str, mode: int, top_k: int, *, rerank: bool = False,
                 fusion: int = 0) -> pb.SearchResponse:
    request = pb.SearchRequest(collection=f"collections/{harness.COLLECTION}",
                               query=query[:current.running.settings.max_query_chars], top_k=top_k, mode=mode)  # type: ignore[arg-type]
    request.rerank.enabled = rerank
    request.fusion.method = fusion  # type: ignore[assignment]
    return await current.stub.Search(request, metadata=harness.METADATA)


async def service_rankings(current: harness.Session, mode: int, fusion: int = 0) -> dict[str, list[str]]:
    out = {}
    for qid in sorted(current.dataset.queries):
        out[qid] = current.ranking(await search(current, current.dataset.queries[qid], mode, QUALITY_TOP_K,
                                                fusion=fusion))
    return out


async def timed_searches(current: harness.Session, queries: list[str], mode: int, *, rerank: bool = False,
                         fusion: int = 0) -> dict[str, Any]:
    samples: list[float] = []
    server: list[float] = []
    stages: dict[str, list[float]] = {}
    for query in queries[:5]:  # warm
        await search(current, query, mode, LATENCY_TOP_K, rerank=rerank, fusion=fusion)
    for query in queries:
        started = time.perf_counter()
        response = await search(current, query, mode, LATENCY_TOP_K, rerank=rerank, fusion=fusion)
        samples.append(time.perf_counter() - started)
        server.append(response.latency_ms)
        for stage in response.stages:
            stages.setdefault(stage.stage, []).append(stage.latency_ms)
    out: dict[str, Any] = dict(latency_of(samples))
    out["server_p50_ms"] = round(float(np.percentile(server, 50)), 3)
    out["stages_mean_ms"] = {name: round(float(np.mean(v)), 3) for name, v in stages.items()}
    return out


async def concurrent_qps(current: harness.Session, queries: list[str], mode: int, concurrency: int) -> float:
    pending = list(queries)

    async def worker() -> None:
        while pending:
            await search(current, pending.pop(), mode, LATENCY_TOP_K)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return round(len(queries) / (time.perf_counter() - started), 1)


async def ingest(current: harness.Session, collection_id: str, docs: list[tuple[str, str]]) -> dict[str, Any]:
    """Time one IngestDocuments stream of `docs` (id, text) into a new collection."""
    await current.stub.CreateCollection(pb.CreateCollectionRequest(collection_id=collection_id), metadata=harness.METADATA)

    async def requests() -> AsyncIterator[pb.IngestDocumentsRequest]:
        yield pb.IngestDocumentsRequest(config=pb.IngestConfig(collection=f"collections/{collection_id}"))
        for raw, text in docs:
            yield pb.IngestDocumentsRequest(document=pb.DocumentInput(document_id=harness.document_id(raw), text=text))

    summary = pb.IngestSummary()
    started = time.perf_counter()
    async for reply in current.stub.IngestDocuments(requests(), metadata=harness.METADATA):
        if reply.HasField("summary"):
            summary = reply.summary
    seconds = time.perf_counter() - started
    return {"documents": int(summary.documents_indexed), "chunks": int(summary.chunks_indexed),
            "failed": int(summary.documents_failed), "seconds": round(seconds, 3),
            "docs_per_s": round(summary.documents_indexed / seconds, 1),
            "chunks_per_s": round(summary.chunks_indexed / seconds, 1)}


def builtin_reranker() -> tuple[LearnedReranker | None, str]:
    try:
        model = LearnedReranker.load(BUILTIN_DIR)
    except (ArtifactError, OSError) as error:
        return None, f"no builtin artifact yet ({error})"
    return model, model.version


# --- one collection: quality and speed through one session ------------------------------------


async def bench_collection(dataset: judged.Dataset, args: argparse.Namespace, areas: set[str],
                           keep: dict[str, Any]) -> dict[str, Any]:
    name = dataset.name
    result: dict[str, Any] = {"split": SPLIT, "documents": len(dataset.corpus), "queries": len(dataset.queries)}
    cache = args.cache
    started = time.perf_counter()
    async with harness.session(dataset, cache_dir=cache) as current:
        live: harness.MemoEncoder = current.running.searcher.embedder
        result["session_open_s"] = round(time.perf_counter() - started, 1)
        result["session_open_note"] = (f"service start + IngestDocuments of the whole corpus; {live.added} texts "
                                       "embedded in this run (0: every vector came from the memo)")
        qids = sorted(dataset.queries)
        queries = [dataset.queries[q] for q in qids]
        first = await search(current, queries[0], pb.SEARCH_MODE_HYBRID, LATENCY_TOP_K)
        result["chunks"] = int(first.candidates_considered)
        result["index_build_ms"] = round(next((s.latency_ms for s in first.stages if s.stage == "index"), 0.0), 1)
        log(f"{name}: {len(dataset.corpus)} documents, {result['chunks']} chunks, {len(qids)} queries "
            f"(opened in {result['session_open_s']} s)")
        ids, texts = documents(dataset)
        vectors = doc_vectors(live, texts, cache, name)
        query_vectors = dict(zip(qids, live.encode(queries), strict=True))
        direct = Direct(ids, texts, vectors)
        langchain = await asyncio.to_thread(run_langchain, dataset, ids, texts, vectors, query_vectors, args)
        if "quality" in areas:
            result["quality"] = await quality(current, direct, query_vectors, langchain, args)
        if "speed" in areas:
            result["speed"] = await speed(current, direct, query_vectors, langchain, args)
        if "memory" in areas and name == "scifact":
            coll = current.running.store.get_collection(harness.TENANT, harness.COLLECTION)
            _, chunks = await asyncio.to_thread(current.running.store.indexed_chunks, coll.pk)
            keep["chunks"] = chunks
            keep["query_vectors"] = np.stack([query_vectors[q] for q in qids])
    return result


async def quality(current: harness.Session, direct: Direct, query_vectors: dict[str, np.ndarray],
                  langchain: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    dataset = current.dataset
    name, qrels = dataset.name, dataset.qrels
    service: dict[str, Any] = {}
    for label, mode in MODES.items():
        log(f"{name}: service {label} over {len(dataset.queries)} queries")
        service[label] = quality_of(await service_rankings(current, mode), qrels)
    log(f"{name}: service hybrid (convex fusion) over {len(dataset.queries)} queries")
    service["hybrid_convex"] = quality_of(await service_rankings(current, pb.SEARCH_MODE_HYBRID,
                                                                 pb.FUSION_METHOD_CONVEX), qrels)
    service["hybrid_convex"]["note"] = ("min-max normalised dense and sparse scores, equal weights "
                                        "(FusionOptions.method = FUSION_METHOD_CONVEX)")
    log(f"{name}: hybrid + rerank, {args.folds}-fold cross-validation")
    cv = await crossval_session(current, split=SPLIT, k=args.folds, seed=0)
    service["hybrid_rerank_crossval"] = {
        "ndcg10": round(cv.rerank_ndcg10, 4), "recall100": service["hybrid"]["recall100"], "queries": cv.queries,
        "hybrid_ndcg10_same_folds": round(cv.hybrid_ndcg10, 4), "gain": round(cv.gain, 4), "folds": cv.k,
        "candidates": cv.candidates, "rerank_stage_p50_ms": round(cv.rerank_ms_p50, 3),
        "rerank_stage_p99_ms": round(cv.rerank_ms_p99, 3),
        "note": "each query re-ranked by a model trained on the other folds only; rerank re-orders the 100 "
                "hybrid candidates, so recall@100 is hybrid's"}
    if name != "scifact":
        model, version = builtin_reranker()
        if model is None:
            service["hybrid_rerank_builtin"] = {"skipped": version}
        else:
            runs = await current.evaluate(sorted(dataset.queries), model)
            entry: dict[str, Any] = dict(quality_of({r.query_id: r.ranking for r in runs}, qrels))
            entry.update(recall100=service["hybrid"]["recall100"], model_version=version,
                         rerank_stage_p50_ms=round(float(np.percentile([r.rerank_ms for r in runs], 50)), 3),
                         note="the builtin artifact (trained on SciFact train only): CISI is unseen")
            service["hybrid_rerank_builtin"] = entry
        current.install(None)
    peers: dict[str, Any] = {}
    rankings: dict[str, dict[str, list[str]]] = {"bm25s_direct": {}, "faiss_flat_direct": {}, "rrf_of_direct": {}}
    for qid, query in dataset.queries.items():
        vector = query_vectors[qid]
        rankings["bm25s_direct"][qid] = direct.named(direct.sparse(query, 100))
        rankings["faiss_flat_direct"][qid] = direct.named(direct.dense(vector, 100))
        rankings["rrf_of_direct"][qid] = direct.named(direct.hybrid(query, vector, 100))
    for label, ranked in rankings.items():
        peers[label] = quality_of(ranked, qrels)
    peers["note"] = ("whole documents (FAISS: MiniLM truncates each to 256 tokens), same k1/b/stop words/stemmer "
                     "as the service; rrf_of_direct fuses the two with k = 60 and the service's over-fetch")
    if "rankings" in langchain:
        peers["langchain_ensemble"] = {**quality_of(langchain["rankings"], qrels),
                                       "bm25_alone": quality_of(langchain["parts"]["bm25"], qrels),
                                       "faiss_alone": quality_of(langchain["parts"]["faiss"], qrels),
                                       "versions": langchain["versions"], "note": langchain["note"]}
    else:
        peers["langchain_ensemble"] = {k: v for k, v in langchain.items() if k in ("skipped", "failed")}
    lc_ndcg = peers["langchain_ensemble"].get("ndcg10")
    lc_recall = peers["langchain_ensemble"].get("recall100")
    ratios = {
        "service_sparse_over_bm25s_ndcg10": ratio(service["sparse"]["ndcg10"], peers["bm25s_direct"]["ndcg10"]),
        "service_dense_over_faiss_ndcg10": ratio(service["dense"]["ndcg10"], peers["faiss_flat_direct"]["ndcg10"]),
        "service_hybrid_over_rrf_of_direct_ndcg10": ratio(service["hybrid"]["ndcg10"],
                                                          peers["rrf_of_direct"]["ndcg10"]),
        "service_rerank_crossval_over_best_peer_ndcg10": ratio(
            service["hybrid_rerank_crossval"]["ndcg10"],
            max(peers[p]["ndcg10"] for p in ("bm25s_direct", "faiss_flat_direct", "rrf_of_direct"))),
        "service_hybrid_over_langchain_ndcg10": ratio(service["hybrid"]["ndcg10"], lc_ndcg),
        "service_hybrid_convex_over_langchain_ndcg10": ratio(service["hybrid_convex"]["ndcg10"], lc_ndcg),
        "service_hybrid_over_langchain_recall100": ratio(service["hybrid"]["recall100"], lc_recall),
        "service_hybrid_convex_over_langchain_recall100": ratio(service["hybrid_convex"]["recall100"], lc_recall),
        "service_rerank_crossval_over_langchain_ndcg10": ratio(service["hybrid_rerank_crossval"]["ndcg10"], lc_ndcg),
    }
    return {"service": service, "peers": peers, "ratios": ratios, "goals": goals_of(service)}


def _goal(value: float, baseline: float, baseline_of: str) -> dict[str, Any]:
    gain = round(value - baseline, 4)
    return {"ndcg10": round(value, 4), "baseline_ndcg10": round(baseline, 4), "baseline": baseline_of,
            "gain": gain, "target_gain": GOAL_MARGIN, "met": bool(gain >= GOAL_MARGIN - 1e-9)}


def goals_of(service: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets on nDCG@10: hybrid (each fusion, and the better of the two) >= the better
    single retriever + 0.02; hybrid + rerank >= hybrid + 0.02."""
    single = max(("sparse", "dense"), key=lambda m: service[m]["ndcg10"])
    best_single = float(service[single]["ndcg10"])
    fusion = max(("hybrid", "hybrid_convex"), key=lambda m: service[m]["ndcg10"])
    cv = service["hybrid_rerank_crossval"]
    out: dict[str, Any] = {
        "hybrid_rrf_over_best_single": _goal(service["hybrid"]["ndcg10"], best_single, single),
        "hybrid_convex_over_best_single": _goal(service["hybrid_convex"]["ndcg10"], best_single, single),
        "hybrid_best_over_best_single": {**_goal(service[fusion]["ndcg10"], best_single, single),
                                         "fusion": "rrf" if fusion == "hybrid" else "convex"},
        # the reranker re-orders the RRF hybrid candidates: its baseline is hybrid RRF on the same folds
        "rerank_crossval_over_hybrid": _goal(cv["ndcg10"], cv["hybrid_ndcg10_same_folds"], "hybrid"),
        "rerank_crossval_over_best_hybrid": _goal(cv["ndcg10"], service[fusion]["ndcg10"], fusion),
    }
    builtin = service.get("hybrid_rerank_builtin", {})
    if "ndcg10" in builtin:
        out["rerank_builtin_over_hybrid"] = _goal(builtin["ndcg10"], service["hybrid"]["ndcg10"], "hybrid")
    out["all_met"] = all(v["met"] for v in out.values() if isinstance(v, dict))
    return out


async def speed(current: harness.Session, direct: Direct, query_vectors: dict[str, np.ndarray],
                langchain: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    dataset = current.dataset
    qids = sorted(dataset.queries)[:args.latency_queries]
    queries = [dataset.queries[q] for q in qids]
    vectors = [query_vectors[q] for q in qids]
    live: harness.MemoEncoder = current.running.searcher.embedder
    out: dict[str, Any] = {"queries": len(qids), "top_k": LATENCY_TOP_K,
                           "note": "sequential searches over gRPC on 127.0.0.1, the server in this process; query "
                                   "vectors memoised on both sides (query_embedding is the MiniLM cost per query "
                                   "to add to dense and hybrid, for the service and for FAISS alike)"}
    service: dict[str, Any] = {}
    for label, mode in MODES.items():
        log(f"{dataset.name}: latency, service {label}")
        service[label] = await timed_searches(current, queries, mode)
        service[label]["qps_concurrent"] = await concurrent_qps(current, queries, mode, args.concurrency)
    log(f"{dataset.name}: latency, service hybrid (convex fusion)")
    service["hybrid_convex"] = await timed_searches(current, queries, pb.SEARCH_MODE_HYBRID,
                                                    fusion=pb.FUSION_METHOD_CONVEX)
    model, version = builtin_reranker()
    if model is None:  # latency does not depend on what the model learned: fit one on these queries
        model = fit(harness.training_set(await current.record(qids), dataset.name))
        version = f"{model.version} (fitted here for timing; no builtin artifact)"
    current.install(model)
    service["hybrid_rerank"] = await timed_searches(current, queries, pb.SEARCH_MODE_HYBRID, rerank=True)
    service["hybrid_rerank"]["model"] = version
    service["hybrid_rerank"]["candidates"] = max(4 * LATENCY_TOP_K, 50)
    current.install(None)
    out["service"] = service
    out["concurrency"] = args.concurrency

    n = len(qids)
    peers: dict[str, Any] = {
        "bm25s_direct": _time_each(lambda i: direct.sparse(queries[i], LATENCY_TOP_K), n),
        "faiss_flat_direct": _time_each(lambda i: direct.dense(vectors[i], LATENCY_TOP_K), n),
        "rrf_of_direct": _time_each(lambda i: direct.hybrid(queries[i], vectors[i], LATENCY_TOP_K), n),
        "build_s": {"bm25s": round(direct.bm25_build_s, 3), "faiss_flat": round(direct.faiss_build_s, 4)},
        "documents": len(direct.ids),
    }
    if "samples" in langchain:
        peers["langchain_ensemble"] = {**latency_of(langchain["samples"]), "build_s": round(langchain["build_s"], 3),
                                       "note": langchain["note"]}
    else:
        peers["langchain_ensemble"] = {k: v for k, v in langchain.items() if k in ("skipped", "failed")}
    lc = peers["langchain_ensemble"]
    out["peers"] = peers
    embed = queries[:50]
    embedding = await asyncio.to_thread(_time_each, lambda i: live.inner.encode([embed[i]]), len(embed))
    out["query_embedding"] = {"minilm_one_query": embedding}
    out["ratios"] = {
        "sparse_p50_service_over_bm25s": ratio(service["sparse"]["p50_ms"], peers["bm25s_direct"]["p50_ms"]),
        "dense_p50_service_over_faiss": ratio(service["dense"]["p50_ms"], peers["faiss_flat_direct"]["p50_ms"]),
        "hybrid_p50_service_over_rrf_of_direct": ratio(service["hybrid"]["p50_ms"], peers["rrf_of_direct"]["p50_ms"]),
        "dense_p50_with_query_embedding_service_over_faiss": ratio(
            service["dense"]["p50_ms"] + embedding["p50_ms"], peers["faiss_flat_direct"]["p50_ms"] + embedding["p50_ms"]),
        "hybrid_p50_with_query_embedding_service_over_rrf_of_direct": ratio(
            service["hybrid"]["p50_ms"] + embedding["p50_ms"], peers["rrf_of_direct"]["p50_ms"] + embedding["p50_ms"]),
        "sparse_qps_service_over_bm25s": ratio(service["sparse"]["qps"], peers["bm25s_direct"]["qps"]),
        "dense_qps_service_over_faiss": ratio(service["dense"]["qps"], peers["faiss_flat_direct"]["qps"]),
        "hybrid_qps_service_over_rrf_of_direct": ratio(service["hybrid"]["qps"], peers["rrf_of_direct"]["qps"]),
        "hybrid_p50_service_over_langchain": ratio(service["hybrid"]["p50_ms"], lc.get("p50_ms")),
        "hybrid_p99_service_over_langchain": ratio(service["hybrid"]["p99_ms"], lc.get("p99_ms")),
        "hybrid_convex_p50_service_over_langchain": ratio(service["hybrid_convex"]["p50_ms"], lc.get("p50_ms")),
        "hybrid_qps_service_over_langchain": ratio(service["hybrid"]["qps"], lc.get("qps")),
    }
    if args.ingest_docs > 0 and dataset.name == "scifact":
        out["ingest"] = await ingest_throughput(current, args.ingest_docs)
    return out


def _time_each(call: Callable[[int], object], n: int) -> dict[str, float]:
    """Latency of call(0..n-1), each once, after five warm calls."""
    for i in range(min(5, n)):
        call(i)
    samples = []
    for i in range(n):
        started = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - started)
    return latency_of(samples)


async def ingest_throughput(current: harness.Session, n: int) -> dict[str, Any]:
    ids, texts = documents(current.dataset)
    docs = list(zip(ids, texts, strict=True))[:n]
    live: harness.MemoEncoder = current.running.searcher.embedder
    log(f"ingest: {len(docs)} documents with memoised vectors")
    memo = await ingest(current, "bench-ingest-memo", docs)
    log(f"ingest: {len(docs)} documents with real MiniLM embedding")
    servicer = current.running.servicer
    servicer.embedder = live.inner
    try:
        cold = await ingest(current, "bench-ingest-embed", docs)
    finally:
        servicer.embedder = live

    def direct_pipeline() -> dict[str, Any]:
        started = time.perf_counter()
        vectors = live.inner.encode([t for _, t in docs])
        Direct([d for d, _ in docs], [t for _, t in docs], vectors)
        seconds = time.perf_counter() - started
        return {"documents": len(docs), "seconds": round(seconds, 3), "docs_per_s": round(len(docs) / seconds, 1)}

    log(f"ingest: the direct pipeline on the same {len(docs)} documents")
    peer = await asyncio.to_thread(direct_pipeline)
    return {"service_memoised_vectors": memo, "service_with_embedding": cold,
            "direct_minilm_bm25s_faiss": peer,
            "embedding_share_of_service_ingest": round(1 - memo["seconds"] / cold["seconds"], 3) if cold["seconds"] else None,
            "service_over_direct_docs_per_s": ratio(cold["docs_per_s"], peer["docs_per_s"]),
            "note": "the service chunks (RECURSIVE, 256 tokens), embeds each chunk, writes SQLite in one "
                    "transaction per document and streams progress; the direct pipeline embeds whole documents "
                    f"(batch {live.inner.batch_size}) and builds bm25s + FAISS flat in memory, no store of record"}


# --- LangChain's EnsembleRetriever, a subprocess of its own venv ------------------------------------


def run_langchain(dataset: judged.Dataset, ids: list[str], texts: list[str], vectors: np.ndarray,
                  query_vectors: dict[str, np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    """tests/benchmarks/peers/langchain_hybrid.py in .peers/retrieval-langchain over the whole documents and
    the same MiniLM vectors as the FAISS peer: its raw output plus a note, or {"skipped"} / {"failed"}."""
    python = Path(args.langchain_python)
    if args.smoke:
        return {"skipped": "--smoke: the LangChain peer is not run"}
    if not python.is_file():
        return {"skipped": f"{python} is missing: run scripts/peers_retrieval.sh"}
    qids = sorted(dataset.queries)
    queries = [dataset.queries[q] for q in qids]
    log(f"{dataset.name}: LangChain EnsembleRetriever (BM25Retriever + FAISS) over {len(qids)} queries")
    with tempfile.TemporaryDirectory(prefix="bench-langchain-") as tmp:
        np.save(Path(tmp) / "docs.npy", np.ascontiguousarray(vectors, dtype=np.float32))
        np.save(Path(tmp) / "queries.npy", np.stack([query_vectors[q] for q in qids]).astype(np.float32))
        spec = {"ids": ids, "texts": texts, "qids": qids, "queries": queries,
                "doc_vectors": str(Path(tmp) / "docs.npy"), "query_vectors": str(Path(tmp) / "queries.npy"),
                "k": QUALITY_TOP_K, "fetch": max(OVERFETCH * QUALITY_TOP_K, MIN_CANDIDATES),
                "latency_k": LATENCY_TOP_K, "latency_fetch": max(OVERFETCH * LATENCY_TOP_K, MIN_CANDIDATES),
                "latency_queries": args.latency_queries, "weights": [0.5, 0.5]}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        try:
            done = subprocess.run([str(python), str(LANGCHAIN_PEER), str(Path(tmp) / "spec.json")],
                                  capture_output=True, text=True, check=False, timeout=args.worker_timeout)
            if done.returncode != 0:
                raise RuntimeError(done.stderr.strip()[-800:])
            raw: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, IndexError) as error:
            log(f"{dataset.name}: LangChain peer failed: {error}")
            return {"failed": str(error)[-800:]}
    raw["note"] = (f"EnsembleRetriever (weights 0.5 / 0.5, c = {RRF_K}) over BM25Retriever (rank_bm25 BM25Okapi "
                   "defaults, words lower-cased, no stop words or stemming) and FAISS.from_embeddings (IndexFlatL2 "
                   "over the unit MiniLM vectors of whole documents, the FAISS peer's), each fetching "
                   f"{spec['fetch']} for quality and {spec['latency_fetch']} when timed (the service's over-fetch); "
                   "in-process calls, query vectors looked up (no MiniLM per query, as for the service)")
    return raw


# --- bm25s vs tantivy, each in a subprocess -------------------------------------------------------

WORKER_COMMON = r"""
import gc, json, sys, time
def status(field):  # VmHWM, not ru_maxrss: that one keeps the parent's peak across fork + exec
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1]) * 1024
    return 0
def rss():
    return status('VmRSS')
def timed(search, queries, k, repeat):
    for q in queries[:10]:
        search(q, k)
    samples = []
    for _ in range(repeat):
        for q in queries:
            t = time.perf_counter()
            search(q, k)
            samples.append(time.perf_counter() - t)
    return samples
spec = json.load(open(sys.argv[1]))
ids = [d[0] for d in spec['docs']]
texts = [d[1] for d in spec['docs']]
qids = [q[0] for q in spec['queries']]
queries = [q[1] for q in spec['queries']]
"""

BM25S_WORKER = WORKER_COMMON + r"""
import bm25s, Stemmer
from importlib.metadata import version
stemmer = Stemmer.Stemmer(spec['stemmer'])
warm = bm25s.BM25(); warm.index(bm25s.tokenize(['warm up the code paths'], stemmer=stemmer, show_progress=False), show_progress=False)
del warm; gc.collect(); before = rss()
t = time.perf_counter()
tokens = bm25s.tokenize(texts, lower=True, stopwords=spec['stopwords'], stemmer=stemmer, show_progress=False)
retriever = bm25s.BM25(k1=spec['k1'], b=spec['b'], method=spec['method'])
retriever.index(tokens, show_progress=False)
build_s = time.perf_counter() - t
del tokens; gc.collect(); after = rss()
arrays = sum(v.nbytes for v in retriever.scores.values() if hasattr(v, 'nbytes'))
vocab = sys.getsizeof(retriever.vocab_dict) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in retriever.vocab_dict.items())
def search(q, k):
    qt = bm25s.tokenize([q], lower=True, stopwords=spec['stopwords'], stemmer=stemmer, show_progress=False)
    docs, scores = retriever.retrieve(qt, k=min(k, len(ids)), show_progress=False, n_threads=1)
    return [ids[int(d)] for d, s in zip(docs[0], scores[0]) if s > 0]
samples = timed(search, queries, spec['latency_k'], spec['repeat'])
print(json.dumps({'library': 'bm25s', 'version': version('bm25s'), 'analyzer': spec['analyzer'],
                  'build_s': build_s, 'rss_delta_bytes': after - before, 'index_bytes': arrays + vocab,
                  'peak_rss_bytes': status('VmHWM'),
                  'samples': samples, 'rankings': {q: search(t, spec['k']) for q, t in zip(qids, queries)}}))
"""

TANTIVY_WORKER = WORKER_COMMON + r"""
import re, tantivy
from importlib.metadata import version
builder = tantivy.SchemaBuilder()
builder.add_text_field('id', stored=True, tokenizer_name='raw')
builder.add_text_field('body', stored=False, tokenizer_name=spec['analyzer'], index_option='freq')
schema = builder.build()
def new_index():
    made = tantivy.Index(schema)  # in RAM, like bm25s
    if spec['analyzer'] == 'en_stem_stop':
        made.register_tokenizer('en_stem_stop', tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
            .filter(tantivy.Filter.remove_long(40)).filter(tantivy.Filter.lowercase())
            .filter(tantivy.Filter.stopword('english')).filter(tantivy.Filter.stemmer('english')).build())
    return made
warm = new_index(); w = warm.writer(heap_size=15_000_000, num_threads=1)
w.add_document(tantivy.Document(id='w', body='warm up the code paths')); w.commit(); w.wait_merging_threads()
del w, warm; gc.collect(); before = rss()
t = time.perf_counter()
index = new_index()
writer = index.writer(heap_size=50_000_000, num_threads=1)
for i, text in zip(ids, texts):
    writer.add_document(tantivy.Document(id=i, body=text))
writer.commit()
writer.wait_merging_threads()
index.reload()
searcher = index.searcher()
build_s = time.perf_counter() - t
del writer; gc.collect(); after = rss()
WORD = re.compile(r'[\W_]+')  # what tantivy's simple tokenizer splits on: one term never becomes a phrase
def search(q, k):
    clean = WORD.sub(' ', q).lower().strip()  # plain terms: no query syntax, no AND/OR/NOT operators
    if not clean:
        return []
    hits = searcher.search(index.parse_query(clean, ['body']), limit=k).hits
    return [searcher.doc(address)['id'][0] for _, address in hits]
samples = timed(search, queries, spec['latency_k'], spec['repeat'])
print(json.dumps({'library': 'tantivy', 'version': version('tantivy'), 'analyzer': spec['analyzer'],
                  'build_s': build_s, 'rss_delta_bytes': after - before, 'index_bytes': None,
                  'peak_rss_bytes': status('VmHWM'),
                  'samples': samples, 'rankings': {q: search(t, spec['k']) for q, t in zip(qids, queries)}}))
"""


def run_worker(python: str, script: str, spec_file: Path, timeout: float) -> dict[str, Any]:
    done = subprocess.run([python, "-c", script, str(spec_file)], capture_output=True, text=True, check=False,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{python} worker failed: {done.stderr.strip()[-800:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def bench_bm25(dataset: judged.Dataset, args: argparse.Namespace) -> dict[str, Any]:
    ids, texts = documents(dataset)
    qids = sorted(dataset.queries)
    repeat = max(1, math.ceil(args.bm25_samples / len(qids)))
    tantivy_python = Path(args.tantivy_python)
    out: dict[str, Any] = {"documents": len(ids), "queries": len(qids), "latency_samples": repeat * len(qids),
                           "k1": K1, "b": B}
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-bm25-") as tmp:
        spec = {"docs": list(zip(ids, texts, strict=True)), "queries": [(q, dataset.queries[q]) for q in qids],
                "k": 100, "latency_k": LATENCY_TOP_K, "repeat": repeat, "k1": K1, "b": B, "method": BM25_METHOD,
                "stopwords": STOPWORDS, "stemmer": STEMMER_LANGUAGE}
        plan = [("bm25s", sys.executable, BM25S_WORKER, "service's: \\w\\w+ lower-cased, bm25s English stop words, "
                 "Snowball English (PyStemmer)")]
        if tantivy_python.is_file():
            plan += [("tantivy_en_stem", str(tantivy_python), TANTIVY_WORKER, "en_stem"),
                     ("tantivy_en_stem_stop", str(tantivy_python), TANTIVY_WORKER, "en_stem_stop")]
        else:
            out["tantivy"] = {"skipped": f"{tantivy_python} is missing: run scripts/peers_retrieval.sh"}
        for label, python, script, analyzer in plan:
            log(f"bm25 {dataset.name}: {label}")
            path = Path(tmp) / f"{label}.json"
            path.write_text(json.dumps({**spec, "analyzer": analyzer}))
            try:
                raw = run_worker(python, script, path, args.worker_timeout)
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as error:
                log(f"bm25 {dataset.name}: {label} failed: {error}")
                out[label] = {"failed": str(error)[-800:]}
                continue
            entry = {"version": raw["version"], "analyzer": raw["analyzer"], "build_s": round(raw["build_s"], 3),
                     **{f"query_{k}": v for k, v in latency_of(raw["samples"]).items() if k != "n"},
                     **quality_of(raw["rankings"], dataset.qrels),
                     "rss_delta_bytes": raw["rss_delta_bytes"], "peak_rss_bytes": raw["peak_rss_bytes"]}
            if raw["index_bytes"] is not None:
                entry["index_bytes"] = raw["index_bytes"]
            runs[label] = entry
    out.update(runs)
    if "tantivy_en_stem" in runs:
        ours, theirs = runs["bm25s"], runs["tantivy_en_stem"]
        out["ratios_bm25s_over_tantivy_en_stem"] = {
            "build_s": ratio(ours["build_s"], theirs["build_s"]),
            "query_p50": ratio(ours["query_p50_ms"], theirs["query_p50_ms"]),
            "query_p99": ratio(ours["query_p99_ms"], theirs["query_p99_ms"]),
            "ndcg10": ratio(ours["ndcg10"], theirs["ndcg10"]),
            "rss_delta": ratio(ours["rss_delta_bytes"], theirs["rss_delta_bytes"]),
        }
        out["winner"] = {
            "build": "bm25s" if ours["build_s"] < theirs["build_s"] else "tantivy",
            "query_p50": "bm25s" if ours["query_p50_ms"] < theirs["query_p50_ms"] else "tantivy",
            "query_p99": "bm25s" if ours["query_p99_ms"] < theirs["query_p99_ms"] else "tantivy",
            "ndcg10": "bm25s" if ours["ndcg10"] >= max(r["ndcg10"] for k, r in runs.items() if k != "bm25s")
            else "tantivy",
            "memory": "bm25s" if ours["rss_delta_bytes"] < theirs["rss_delta_bytes"] else "tantivy",
        }
    out["note"] = ("in-memory indexes, one thread each (tantivy writer num_threads=1, index_option 'freq'; bm25s "
                   "n_threads=1); latency = tokenise + top-10 + ids; the query is plain terms for tantivy "
                   "(non-alphanumeric characters removed, lower-cased so no AND/OR/NOT operators); rss_delta = resident "
                   "growth of a fresh process over building the index (allocator residue included)")
    return out


def bm25_verdict(per_dataset: dict[str, Any]) -> str:
    have = {k: v for k, v in per_dataset.items() if isinstance(v, dict) and "winner" in v}
    if not have:
        return "tantivy not measured"
    parts = []
    for name, entry in have.items():
        wins = entry["winner"]
        parts.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in wins.items()))
    return ("; ".join(parts) + ". For the service bm25s stays: it returns the full score vector that the access-"
            "control / filter mask is applied to before top-k, in-process with numpy, and persists as plain arrays; "
            "tantivy would need the allowed set expressed as a query filter per search.")


# --- memory and HNSW scaling --------------------------------------------------------------------


def dense_bytes(index: Any) -> int:
    """Bytes of a FAISS flat or HNSW index's vectors and graph (what it keeps resident)."""
    if isinstance(index, faiss.IndexHNSW):
        h: Any = index.hnsw
        return int(index.ntotal * EMBEDDING_DIM * 4 + h.neighbors.size() * 4 + h.offsets.size() * 8
                   + h.levels.size() * 4 + h.assign_probas.size() * 8 + h.cum_nneighbor_per_level.size() * 4)
    return int(index.ntotal * EMBEDDING_DIM * 4)


def bm25_bytes(bm25: Any) -> int:
    arrays = sum(v.nbytes for v in bm25.scores.values() if hasattr(v, "nbytes"))
    vocab = sys.getsizeof(bm25.vocab_dict) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in bm25.vocab_dict.items())
    return int(arrays + vocab)


PG_TABLES = ("chunk_vectors", "chunks", "documents")


async def bench_pgvector(dataset: judged.Dataset | None, args: argparse.Namespace) -> dict[str, Any]:
    """Bytes PostgreSQL holds for the pgvector backend after `args.pg_docs` SciFact documents are
    ingested through the service (pgserver in a temp dir), per 10k chunks."""
    if dataset is None:
        return {"skipped": "no SciFact collection"}
    try:
        with warnings.catch_warnings():  # platformdirs warns that XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError as error:
        return {"skipped": f"pgserver is not installed ({error})"}
    from llmo.core.settings import PlatformSettings
    from llmo.retrieval.main import start

    ids, texts = documents(dataset)
    docs = list(zip(ids, texts, strict=True))[:args.pg_docs]
    with tempfile.TemporaryDirectory(prefix="bench-pgvector-") as tmp:
        try:
            server = await asyncio.to_thread(pgserver.get_server, Path(tmp) / "pgdata", cleanup_mode="delete")
        except Exception as error:  # no wheel for this platform, or the server cannot run here
            return {"skipped": f"pgserver (PostgreSQL with pgvector) cannot start on this machine: {error!r}"}
        try:
            settings = RetrievalSettings(
                database_url=str(server.get_uri()), backend="pgvector", metrics_port=-1, publish_events=False,
                reranker="", platform=PlatformSettings(data_dir=Path(tmp), api_keys={harness.API_KEY: harness.TENANT},
                                                       nats_url="nats://127.0.0.1:1", drain_seconds=0.5))
            running = await start(settings, port=0, metrics=False)
            try:
                encoder = harness.MemoEncoder(running.servicer.embedder, args.cache / f"{dataset.name}-minilm.npz"
                                              if args.cache is not None else None)
                running.servicer.embedder = running.searcher.embedder = encoder
                channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
                try:
                    current = harness.Session(running, pb_grpc.RetrievalServiceStub(channel), dataset)
                    log(f"memory: pgvector, ingesting {len(docs)} SciFact documents")
                    summary = await ingest(current, "bench-pgvector", docs)
                finally:
                    await channel.close()
                sizes = await asyncio.to_thread(_pg_sizes, str(server.get_uri()))
            finally:
                await running.stop()
        finally:
            await asyncio.to_thread(server.cleanup)
    chunks = summary["chunks"]
    per = 10_000 / chunks if chunks else 0.0
    search = sizes["chunk_vectors"]["total"]
    return {"documents": summary["documents"], "chunks": chunks, "postgres": sizes["version"],
            "bytes": {t: sizes[t] for t in PG_TABLES},
            "search_bytes_per_10k_chunks": int(search * per),
            "search_parts_per_10k_chunks": {k: int(v * per) for k, v in sizes["chunk_vectors"]["indexes"].items()}
            | {"table_with_toast": int(sizes["chunk_vectors"]["table"] * per)},
            "with_store_of_record_per_10k_chunks": int(sum(sizes[t]["total"] for t in PG_TABLES) * per),
            "note": "pg_total_relation_size (heap + TOAST + indexes) after ingest, on disk in PostgreSQL's pages "
                    "(shared buffers cache what is read); search = chunk_vectors (vector(384), tsvector, HNSW, GIN "
                    "and (collection, document) indexes); store of record = + chunks and documents (texts, "
                    "bytea vectors), which the local backend keeps in its database as well"}


def _pg_sizes(url: str) -> dict[str, Any]:
    from llmo.core.storage import create_engine

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            out: dict[str, Any] = {"version": conn.exec_driver_sql("SHOW server_version").scalar()}
            for table in PG_TABLES:
                total = int(conn.execute(sa.text("SELECT pg_total_relation_size(:t)"), {"t": table}).scalar() or 0)
                heap = int(conn.execute(sa.text("SELECT pg_table_size(:t)"), {"t": table}).scalar() or 0)
                indexes = {str(r[0]): int(r[1]) for r in conn.execute(sa.text(
                    "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index "
                    "WHERE indrelid = CAST(:t AS regclass)"), {"t": table})}
                out[table] = {"total": total, "table": heap, "indexes": indexes}
            return out
    finally:
        engine.dispose()


def bench_memory(chunks: list[Any], query_vectors: np.ndarray | None, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if chunks:
        n = len(chunks)
        builds: dict[str, Any] = {}
        for label, config in (("flat", DenseConfig(hnsw_min_chunks=n + 1)), ("hnsw", DenseConfig(hnsw_min_chunks=0))):
            gc.collect()
            before = rss_bytes()
            started = time.perf_counter()
            index = CollectionIndex.build(1, chunks, k1=K1, b=B, dense_config=config)
            seconds = time.perf_counter() - started
            gc.collect()
            index.config = config
            builds[label] = (index, seconds, rss_bytes() - before)
        flat, hnsw = builds["flat"][0], builds["hnsw"][0]
        per = 10_000 / n
        sizes = {"bm25": bm25_bytes(flat.bm25), "faiss_flat": dense_bytes(flat.dense), "hnsw": dense_bytes(hnsw.dense)}
        out["scifact_chunks"] = {
            "chunks": n,
            "bytes_per_10k_chunks": {k: int(v * per) for k, v in sizes.items()},
            "bm25_plus_flat_per_10k": int((sizes["bm25"] + sizes["faiss_flat"]) * per),
            "bm25_plus_hnsw_per_10k": int((sizes["bm25"] + sizes["hnsw"]) * per),
            "build_s": {"bm25_plus_flat": round(builds["flat"][1], 3), "bm25_plus_hnsw": round(builds["hnsw"][1], 3)},
            "rss_delta_bytes": {"bm25_plus_flat": builds["flat"][2], "bm25_plus_hnsw": builds["hnsw"][2]},
            "note": "bytes held by the structures (bm25s score arrays + vocabulary; FAISS vectors + HNSW graph "
                    f"links, M = {DenseConfig().m}); rss_delta is the process's resident growth over each build, "
                    "chunk texts excluded",
        }
        if query_vectors is not None and len(query_vectors):
            out["scifact_chunks"]["hnsw_vs_flat"] = compare_dense(flat, hnsw, query_vectors)
        base = np.stack([np.frombuffer(c.embedding, dtype=np.float32) for c in chunks])
    else:
        base = None
    scaling: dict[str, Any] = {"sizes": args.scales, "queries": args.scaling_queries,
                               "hnsw": {"m": DenseConfig().m, "ef_construction": DenseConfig().ef_construction,
                                        "ef_search": DenseConfig().ef_search},
                               "service_threshold_hnsw_min_chunks": DenseConfig().hnsw_min_chunks}
    rng = np.random.default_rng(0)
    sets: list[tuple[str, Callable[[int], np.ndarray], np.ndarray]] = [
        ("random_unit", lambda n: _unit(rng.standard_normal((n, EMBEDDING_DIM))),
         _unit(rng.standard_normal((args.scaling_queries, EMBEDDING_DIM))))]
    if base is not None and query_vectors is not None and len(query_vectors):
        qv = query_vectors[rng.integers(0, len(query_vectors), args.scaling_queries)]
        sets.append(("scifact_jittered", lambda n: _unit(base[rng.integers(0, len(base), n)]
                                                          + rng.normal(0, JITTER_SIGMA, (n, EMBEDDING_DIM))), qv))
    for label, make, queries in sets:
        rows = []
        for n in args.scales:
            log(f"memory: {label} {n} vectors, flat and HNSW")
            vectors = make(n).astype(np.float32)
            flat_index, flat_s = _dense_index(vectors, DenseConfig(hnsw_min_chunks=n + 1))
            hnsw_index, hnsw_s = _dense_index(vectors, DenseConfig(hnsw_min_chunks=0))
            row = {"n": n, **compare_dense(flat_index, hnsw_index, queries),
                   "build_s": {"flat": round(flat_s, 3), "hnsw": round(hnsw_s, 2)},
                   "bytes_per_10k": {"flat": int(dense_bytes(flat_index.dense) * 10_000 / n),
                                     "hnsw": int(dense_bytes(hnsw_index.dense) * 10_000 / n)}}
            rows.append(row)
            del flat_index, hnsw_index, vectors
            gc.collect()
        scaling[label] = rows
    scaling["note"] = ("random_unit: i.i.d. Gaussian vectors normalised (no structure: the hardest case for HNSW); "
                       f"scifact_jittered: the SciFact chunk vectors resampled with Gaussian noise (sigma {JITTER_SIGMA} "
                       "per dimension) and re-normalised, queried with real SciFact query vectors. Searched through "
                       "CollectionIndex.dense_search (the service's path), every vector allowed; recall@10 against "
                       "the exact flat result")
    out["scaling"] = scaling
    return out


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _dense_index(vectors: np.ndarray, config: DenseConfig) -> tuple[CollectionIndex, float]:
    """A CollectionIndex with only a dense part (no BM25), built as CollectionIndex.build builds its dense index."""
    n = len(vectors)
    started = time.perf_counter()
    dense: Any
    if n < config.hnsw_min_chunks:
        dense = faiss.IndexFlatIP(EMBEDDING_DIM)
    else:
        dense = faiss.IndexHNSWFlat(EMBEDDING_DIM, config.m, faiss.METRIC_INNER_PRODUCT)
        dense.hnsw.efConstruction = config.ef_construction
    dense.add(vectors)
    seconds = time.perf_counter() - started
    index = CollectionIndex(1, np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64), [("synthetic", [], {})],
                            None, dense)
    index.config = config
    return index, seconds


def compare_dense(flat: CollectionIndex, hnsw: CollectionIndex, queries: np.ndarray, k: int = 10) -> dict[str, Any]:
    allowed = np.ones(flat.size, dtype=bool)
    samples: dict[str, list[float]] = {"flat": [], "hnsw": []}
    recalls = []
    for q in queries[:5]:
        flat.dense_search(q, allowed, k)
        hnsw.dense_search(q, allowed, k)
    for q in queries:
        started = time.perf_counter()
        exact = flat.dense_search(q, allowed, k)
        samples["flat"].append(time.perf_counter() - started)
        started = time.perf_counter()
        approx = hnsw.dense_search(q, allowed, k)
        samples["hnsw"].append(time.perf_counter() - started)
        recalls.append(len({h.position for h in exact} & {h.position for h in approx}) / max(1, len(exact)))
    flat_l, hnsw_l = latency_of(samples["flat"]), latency_of(samples["hnsw"])
    return {"flat_p50_ms": flat_l["p50_ms"], "flat_p99_ms": flat_l["p99_ms"], "hnsw_p50_ms": hnsw_l["p50_ms"],
            "hnsw_p99_ms": hnsw_l["p99_ms"], "hnsw_recall10": round(float(np.mean(recalls)), 4),
            "hnsw_speedup_p50": ratio(flat_l["p50_ms"], hnsw_l["p50_ms"], 2)}


# --- a generated tiny collection (--smoke) ------------------------------------------------------

TOPICS = {
    "volcano": "volcano magma eruption lava crust ash basalt tectonic",
    "penguin": "penguin flightless bird swim antarctic colony feather krill",
    "baking": "cake flour butter sugar oven bake dough yeast",
    "plants": "photosynthesis sunlight chlorophyll leaf glucose stomata plant carbon",
    "brain": "neuron brain synapse memory cortex dopamine hippocampus signal",
    "vaccine": "vaccine immune antibody virus infection antigen dose trial",
}
FILLER = "the study shows that results were measured in a large sample over several years".split()


def write_tiny_collections(root: Path, docs_per_topic: int = 6, seed: int = 0) -> Path:
    """SciFact-like (BEIR) and CISI-like (SMART) collections of generated topical documents under
    `root/retrieval/`, with two judged queries per topic; returns `root`."""
    rng = random.Random(seed)
    docs: list[tuple[str, str, str, str]] = []  # id, topic, title, text
    for t, (topic, words) in enumerate(TOPICS.items()):
        vocab = words.split()
        for i in range(docs_per_topic):
            sentences = [" ".join(rng.sample(vocab, 3) + rng.sample(FILLER, 4)).capitalize() + "."
                         for _ in range(rng.randint(2, 5))]
            docs.append((str(100 * (t + 1) + i), topic, f"On {' and '.join(rng.sample(vocab, 2))}", " ".join(sentences)))
    queries = [(str(10 * (t + 1) + j), topic, " ".join(random.Random(seed + t * 7 + j).sample(words.split(), 3)))
               for t, (topic, words) in enumerate(TOPICS.items()) for j in range(2)]
    beir = root / "retrieval" / "scifact"
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": ti, "text": tx}) + "\n"
                                               for d, _, ti, tx in docs))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": tx}) + "\n" for q, _, tx in queries))
    rows = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t1" for q, qt, _ in queries for d, dt, _, _ in docs
                                             if dt == qt and int(d) % 2 == int(q) % 2]
    (beir / "qrels" / "train.tsv").write_text("\n".join(rows) + "\n")
    smart = root / "retrieval" / "cisi"
    smart.mkdir(parents=True, exist_ok=True)
    (smart / "CISI.ALL").write_text("".join(f".I {n}\n.T\n{ti}\n.A\nBench, A.\n.W\n{tx}\n.X\n{n}\t5\t{n}\n"
                                            for n, (_, _, ti, tx) in enumerate(docs, 1)))
    (smart / "CISI.QRY").write_text("".join(f".I {n}\n.W\n{tx}\n" for n, (_, _, tx) in enumerate(queries, 1)))
    number = {d: n for n, (d, _, _, _) in enumerate(docs, 1)}
    (smart / "CISI.REL").write_text("".join(f" {qn} {number[d]} 0 0.0\n" for qn, (_, qt, _) in enumerate(queries, 1)
                                            for d, dt, _, _ in docs if dt == qt))
    return root


# --- the run ------------------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    areas = set(args.areas)
    result: dict[str, Any] = {
        "machine": machine(), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "options": {"data": str(args.data), "cache": str(args.cache) if args.cache else None,
                    "areas": sorted(areas), "quick": args.quick, "smoke": args.smoke, "folds": args.folds,
                    "queries": args.queries, "latency_queries": args.latency_queries, "ingest_docs": args.ingest_docs,
                    "scales": args.scales, "concurrency": args.concurrency, "pg_docs": args.pg_docs},
        "embedding_model": EMBEDDING_MODEL,
        "anchors": ANCHORS,
    }
    keep: dict[str, Any] = {}
    loaded: dict[str, judged.Dataset] = {}
    for name, folder in DATASETS.items():
        path = args.data / folder
        if not path.is_dir():
            result[name] = {"skipped": f"{path} is missing"}
            continue
        loaded[name] = subset(judged.load(path, SPLIT), args.queries.get(name))
    collections: dict[str, Any] = {}
    for name, dataset in loaded.items():
        if areas & {"quality", "speed", "memory"}:
            collections[name] = await bench_collection(dataset, args, areas, keep)
    for area in ("quality", "speed"):
        if area in areas:
            result[area] = {name: {"documents": c["documents"], "chunks": c["chunks"], "queries": c["queries"],
                                   **c[area]} for name, c in collections.items() if area in c}
    if collections:
        result["collections"] = {name: {k: v for k, v in c.items() if k not in ("quality", "speed")}
                                 for name, c in collections.items()}
    if "bm25" in areas:
        per: dict[str, Any] = {name: await asyncio.to_thread(bench_bm25, dataset, args) for name, dataset in loaded.items()}
        per["verdict"] = bm25_verdict(per)
        result["bm25"] = per
    if "memory" in areas:
        memory = await asyncio.to_thread(bench_memory, keep.get("chunks", []), keep.get("query_vectors"), args)
        memory["pgvector"] = await bench_pgvector(loaded.get("scifact"), args)
        memory["backends_bytes_per_10k_chunks"] = backends_summary(memory)
        result["memory"] = memory
    return result


def backends_summary(memory: dict[str, Any]) -> dict[str, Any]:
    """Bytes per 10k chunks of each backend's search structures, side by side."""
    out: dict[str, Any] = {}
    local = memory.get("scifact_chunks")
    if local:
        out["local_bm25_plus_flat"] = local["bm25_plus_flat_per_10k"]
        out["local_bm25_plus_hnsw"] = local["bm25_plus_hnsw_per_10k"]
    pg = memory.get("pgvector", {})
    if "search_bytes_per_10k_chunks" in pg:
        out["pgvector_chunk_vectors"] = pg["search_bytes_per_10k_chunks"]
        out["pgvector_over_local_hnsw"] = ratio(pg["search_bytes_per_10k_chunks"], out.get("local_bm25_plus_hnsw"))
    else:
        out["pgvector_chunk_vectors"] = pg
    out["note"] = ("local: resident bytes of bm25s + FAISS in the service process; pgvector: bytes of chunk_vectors "
                   "and its indexes in PostgreSQL (disk pages, cached by shared buffers)")
    return out


def _sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="llmo bench retrieval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder holding retrieval/scifact and retrieval/cisi (default ../shared/data)")
    parser.add_argument("--areas", default=",".join(AREAS), help=f"comma-separated subset of {','.join(AREAS)}")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder memoising MiniLM vectors (default .llmo/bench-retrieval-cache; none with --smoke)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    parser.add_argument("--quick", action="store_true", help="a subset of the queries and sizes (a few minutes)")
    parser.add_argument("--smoke", action="store_true",
                        help="a generated tiny collection instead of --data, tiny sizes (the test runs this)")
    parser.add_argument("--folds", type=int, default=None, help="cross-validation folds (default 5; quick 3)")
    parser.add_argument("--latency-queries", type=int, default=None, help="queries timed per mode (default 300)")
    parser.add_argument("--ingest-docs", type=int, default=None, help="SciFact documents ingested for throughput")
    parser.add_argument("--scales", type=_sizes, default=None, help="vector counts for HNSW vs flat")
    parser.add_argument("--scaling-queries", type=int, default=None, help="queries per HNSW/flat size (default 200)")
    parser.add_argument("--bm25-samples", type=int, default=None, help="timed queries per BM25 library (default 500)")
    parser.add_argument("--concurrency", type=int, default=4, help="in-flight searches for the concurrent queries/s")
    parser.add_argument("--tantivy-python", default=str(DEFAULT_TANTIVY_PYTHON),
                        help="python of the venv with tantivy (scripts/peers_retrieval.sh makes .peers/retrieval)")
    parser.add_argument("--langchain-python", default=str(DEFAULT_LANGCHAIN_PYTHON),
                        help="python of the venv with LangChain (scripts/peers_retrieval.sh makes .peers/retrieval-langchain)")
    parser.add_argument("--pg-docs", type=int, default=None,
                        help="SciFact documents ingested into pgvector for its memory (default 1000)")
    parser.add_argument("--worker-timeout", type=float, default=900.0, help="seconds per peer subprocess")
    args = parser.parse_args(argv)
    args.areas = [a.strip() for a in args.areas.split(",") if a.strip()]
    unknown = set(args.areas) - set(AREAS)
    if unknown:
        parser.error(f"unknown areas {sorted(unknown)}; choose from {','.join(AREAS)}")
    preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    defaults = {
        "full": {"folds": 5, "latency_queries": 300, "ingest_docs": 1000, "scales": [10_000, 50_000, 100_000],
                 "scaling_queries": 200, "bm25_samples": 500, "queries": {}, "pg_docs": 1000},
        "quick": {"folds": 3, "latency_queries": 100, "ingest_docs": 300, "scales": [10_000, 50_000],
                  "scaling_queries": 100, "bm25_samples": 200, "queries": {"scifact": 200, "cisi": 60},
                  "pg_docs": 500},
        "smoke": {"folds": 2, "latency_queries": 8, "ingest_docs": 6, "scales": [300, 600], "scaling_queries": 10,
                  "bm25_samples": 12, "queries": {}, "pg_docs": 36},
    }[preset]
    if args.cache is None and not args.smoke:
        args.cache = DEFAULT_CACHE
    for key, value in defaults.items():
        if getattr(args, key, None) is None or key == "queries":
            setattr(args, key, value)
    configure_logging("retrieval", level="warning")
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    with contextlib.ExitStack() as stack:
        if args.smoke:
            args.data = write_tiny_collections(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-tiny-"))))
        result = asyncio.run(_run(args))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
