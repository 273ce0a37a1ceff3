"""The service's own first stage for training and evaluating the reranker, through the real code
path: the retrieval service started in-process on a temporary data directory (SQLite), the
collection ingested with IngestDocuments and every query sent as a Search over gRPC.

Features are recorded by a `Recorder` installed as the searcher's reranker: it runs inside
`Searcher._rerank`, on exactly the candidates and index signals the service gives a reranker at
serve time, and keeps the first-stage order. Evaluation installs a trained model the same way.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from llmo.core.settings import PlatformSettings
from llmo.embedding import Embedder, text_key
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.protos.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc
from llmo.retrieval.rerank.data import Dataset
from llmo.retrieval.rerank.features import FEATURE_NAMES, RerankInput, feature_matrix
from llmo.retrieval.rerank.model import TrainingSet
from llmo.retrieval.settings import RetrievalSettings

API_KEY, TENANT, COLLECTION = "rerank-harness", "rerank-harness", "judged"
METADATA = [("authorization", f"Bearer {API_KEY}")]
DEFAULT_CANDIDATES = 100
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def document_id(raw: str) -> str:
    """The data set's id when the service accepts it, else a stable digest of it."""
    return raw if _ID.match(raw) else "d" + hashlib.sha256(raw.encode()).hexdigest()[:24]


class MemoEncoder:
    """The service's embedder with an on-disk memo loaded once and written at the end, so repeated
    runs over the same collection embed it once (llmo.embedding's own cache reloads its file per call)."""

    def __init__(self, inner: Embedder, cache_file: Path | None) -> None:
        self.inner, self.cache_file = inner, cache_file
        self.known: dict[str, np.ndarray] = {}
        self.added = 0
        if cache_file is not None and cache_file.is_file():
            with np.load(cache_file) as saved:
                self.known = dict(zip(saved["keys"].tolist(), saved["vectors"], strict=True))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        keys = [text_key(t) for t in texts]
        missing = sorted({k: t for k, t in zip(keys, texts, strict=True) if k not in self.known}.items())
        if missing:
            for (k, _), v in zip(missing, self.inner.encode([t for _, t in missing]), strict=True):
                self.known[k] = v
            self.added += len(missing)
        if not keys:
            return self.inner.encode([])
        return np.stack([self.known[k] for k in keys]).astype(np.float32)

    def save(self) -> None:
        if self.cache_file is None or not self.added:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(list(self.known)), vectors=np.stack(list(self.known.values())))
        tmp.replace(self.cache_file)


class Recorder:
    """A reranker that scores nothing: it records the features of the candidates it is given and
    keeps their first-stage order."""

    version = "feature-recorder"

    def __init__(self) -> None:
        self.features = np.zeros((0, len(FEATURE_NAMES)))
        self.documents: list[str] = []

    def score(self, batch: RerankInput) -> list[float]:
        self.features = feature_matrix(batch)
        self.documents = [c.document.document_id for c in batch.candidates]
        return [float(len(batch.candidates) - i) for i in range(len(batch.candidates))]


@dataclass
class QueryRun:
    query_id: str
    ranking: list[str]  # distinct document ids (the data set's), best first
    rerank_ms: float = 0.0
    features: np.ndarray = field(default_factory=lambda: np.zeros((0, len(FEATURE_NAMES))))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0))


def training_set(runs: Sequence[QueryRun], source: str) -> TrainingSet:
    kept = [r for r in runs if len(r.labels)]
    return TrainingSet(np.vstack([r.features for r in kept]) if kept else np.zeros((0, len(FEATURE_NAMES))),
                       np.concatenate([r.labels for r in kept]) if kept else np.zeros(0),
                       [len(r.labels) for r in kept], [source] * len(kept))


class Session:
    """One in-process retrieval service holding one judged collection."""

    def __init__(self, running: Any, stub: pb_grpc.RetrievalServiceStub, dataset: Dataset) -> None:
        self.running, self.stub, self.dataset = running, stub, dataset
        self.to_dataset = {document_id(d): d for d in dataset.corpus}

    async def ingest(self) -> pb.IngestSummary:
        await self.stub.CreateCollection(pb.CreateCollectionRequest(
            collection_id=COLLECTION, collection=pb.Collection(display_name=self.dataset.name)), metadata=METADATA)

        async def requests() -> AsyncIterator[pb.IngestDocumentsRequest]:
            yield pb.IngestDocumentsRequest(config=pb.IngestConfig(collection=f"collections/{COLLECTION}"))
            for raw, (title, text) in sorted(self.dataset.corpus.items()):
                body = f"{title}\n\n{text}" if title and text else (title or text)
                if body.strip():
                    yield pb.IngestDocumentsRequest(document=pb.DocumentInput(
                        document_id=document_id(raw), text=body, display_name=title[:1024]))

        summary = pb.IngestSummary()
        async for reply in self.stub.IngestDocuments(requests(), metadata=METADATA):
            if reply.HasField("summary"):
                summary = reply.summary
        return summary

    def install(self, reranker: Any) -> None:
        self.running.searcher.reranker = reranker

    async def search(self, query: str, *, rerank: bool, candidates: int = DEFAULT_CANDIDATES) -> pb.SearchResponse:
        limit = self.running.settings.max_query_chars
        request = pb.SearchRequest(collection=f"collections/{COLLECTION}", query=query[:limit], top_k=candidates,
                                   mode=pb.SEARCH_MODE_HYBRID)
        if rerank:
            request.rerank.enabled, request.rerank.candidates = True, candidates
        return await self.stub.Search(request, metadata=METADATA)

    def ranking(self, response: pb.SearchResponse) -> list[str]:
        out: list[str] = []
        for result in response.results:
            doc = self.to_dataset.get(result.chunk.document.rsplit("/", 1)[1], "")
            if doc and doc not in out:
                out.append(doc)
        return out

    async def record(self, query_ids: Sequence[str], candidates: int = DEFAULT_CANDIDATES) -> list[QueryRun]:
        """First-stage rankings of the queries with the features and labels of their candidates."""
        recorder = Recorder()
        self.install(recorder)
        runs = []
        for qid in query_ids:
            response = await self.search(self.dataset.queries[qid], rerank=True, candidates=candidates)
            judged = self.dataset.qrels.get(qid, {})
            labels = np.array([judged.get(self.to_dataset.get(d, ""), 0) for d in recorder.documents], dtype=np.float64)
            runs.append(QueryRun(qid, self.ranking(response), features=recorder.features, labels=labels))
            recorder.features, recorder.documents = np.zeros((0, len(FEATURE_NAMES))), []
        return runs

    async def evaluate(self, query_ids: Sequence[str], reranker: Any | None,
                       candidates: int = DEFAULT_CANDIDATES) -> list[QueryRun]:
        """Rankings of the queries: plain hybrid when `reranker` is None, else re-ranked by it."""
        self.install(reranker)
        runs = []
        for qid in query_ids:
            response = await self.search(self.dataset.queries[qid], rerank=reranker is not None, candidates=candidates)
            stage = sum(s.latency_ms for s in response.stages if s.stage == "rerank")
            runs.append(QueryRun(qid, self.ranking(response), rerank_ms=stage))
        return runs


@asynccontextmanager
async def session(dataset: Dataset, *, cache_dir: Path | None = None) -> AsyncIterator[Session]:
    """The service started on a temporary data directory with `dataset` ingested; the MiniLM vectors
    of its chunks and queries are memoised under `cache_dir` when given."""
    from llmo.retrieval.main import start

    with tempfile.TemporaryDirectory(prefix="llmo-rerank-") as tmp:
        data = Path(tmp)
        settings = RetrievalSettings(
            database_url=f"sqlite:///{data / 'retrieval.db'}", metrics_port=-1, publish_events=False, reranker="",
            platform=PlatformSettings(data_dir=data, api_keys={API_KEY: TENANT}, nats_url="nats://127.0.0.1:1",
                                      drain_seconds=0.5))
        running = await start(settings, port=0, metrics=False)
        encoder = MemoEncoder(running.searcher.embedder,
                              cache_dir / f"{dataset.name}-minilm.npz" if cache_dir is not None else None)
        running.searcher.embedder = running.servicer.embedder = encoder
        if hasattr(running.searcher.first_stage, "embedder"):  # the local first stage embeds the queries itself
            running.searcher.first_stage.embedder = encoder
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        try:
            current = Session(running, pb_grpc.RetrievalServiceStub(channel), dataset)
            await current.ingest()
            encoder.save()
            yield current
        finally:
            encoder.save()
            await channel.close()
            await running.stop()
