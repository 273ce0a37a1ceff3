"""The retrieval service, declared on the service kit: gRPC RetrievalService over a SQL store of
record with BM25 and FAISS indexes derived from it, and document_ingested events through the outbox."""

from __future__ import annotations

import asyncio

from llmo.core import kit as service_kit
from llmo.core.kit import Kit, ServiceSpec
from llmo.embedding import Embedder
from llmo.protos.retrieval.v1 import retrieval_service_pb2_grpc
from llmo.retrieval.indexes import IndexManager
from llmo.retrieval.rerank import load_reranker
from llmo.retrieval.search import Searcher
from llmo.retrieval.servicer import RetrievalServicer
from llmo.retrieval.settings import RetrievalSettings
from llmo.retrieval.storage import RetrievalStore

SERVICE_NAME = "llmo.retrieval.v1.RetrievalService"


async def build(kit: Kit[RetrievalSettings]) -> None:
    settings = kit.settings
    store = await kit.storage(lambda: RetrievalStore.open(settings.resolved_database_url()), RetrievalStore.close)
    publisher = kit.outbox_publisher() if settings.publish_events else None
    indexes = IndexManager(store, settings.resolved_index_dir(), k1=settings.bm25_k1, b=settings.bm25_b,
                           cached=settings.cached_collections)
    # The model loads on the first ingest or search (seconds), not at start.
    embedder = Embedder(batch_size=settings.embed_batch_size, max_seq_length=256)
    searcher = Searcher(store, indexes, embedder, settings, publisher, reranker=load_reranker(settings))
    servicer = RetrievalServicer(store, indexes, embedder, settings, publisher, searcher)
    kit.grpc(retrieval_service_pb2_grpc.add_RetrievalServiceServicer_to_server, servicer, SERVICE_NAME)
    kit.expose(store=store, indexes=indexes, servicer=servicer, searcher=searcher)


SERVICE = ServiceSpec("retrieval", RetrievalSettings, build)
RunningRetrieval = Kit[RetrievalSettings]


async def start(settings: RetrievalSettings, *, port: int | None = None, metrics: bool = True) -> RunningRetrieval:
    """Start the retrieval service and return its handle; ``port=0`` binds a free port."""
    return await service_kit.start_service(SERVICE, settings, port=port, metrics=metrics)


async def serve(settings: RetrievalSettings | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    await service_kit.serve(SERVICE, settings)


if __name__ == "__main__":
    asyncio.run(serve())
