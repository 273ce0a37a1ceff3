"""The retrieval service, declared on the service kit: gRPC RetrievalService over a SQL store of
record with BM25 and FAISS indexes derived from it, and document_ingested events through the outbox."""

from __future__ import annotations

import asyncio

from llmo.chat_client import ChatClient
from llmo.core import kit as service_kit
from llmo.core.kit import Kit, ServiceSpec
from llmo.embedding import Embedder
from llmo.protos.retrieval.v1 import retrieval_service_pb2_grpc
from llmo.retrieval import backends
from llmo.retrieval.backends import pgvector
from llmo.retrieval.generator import Generator
from llmo.retrieval.graph.llm import LlmExtractor
from llmo.retrieval.indexes import DenseConfig, IndexManager
from llmo.retrieval.rerank import load_reranker
from llmo.retrieval.search import Searcher
from llmo.retrieval.servicer import RetrievalServicer
from llmo.retrieval.settings import RetrievalSettings
from llmo.retrieval.storage import RetrievalStore

SERVICE_NAME = "llmo.retrieval.v1.RetrievalService"


async def build(kit: Kit[RetrievalSettings]) -> None:
    settings = kit.settings
    database_url = settings.resolved_database_url()
    backends.check(settings.backend, database_url)
    if settings.backend == "pgvector":  # before the migrations, so 0003 creates its table
        await asyncio.to_thread(pgvector.create_extension, database_url)
    store = await kit.storage(lambda: RetrievalStore.open(database_url), RetrievalStore.close)
    publisher = kit.outbox_publisher() if settings.publish_events else None
    indexes = IndexManager(store, settings.resolved_index_dir(), k1=settings.bm25_k1, b=settings.bm25_b,
                           cached=settings.cached_collections, dense=DenseConfig.of(settings))
    # The model loads on the first ingest or search (seconds), not at start.
    embedder = Embedder(batch_size=settings.embed_batch_size, max_seq_length=256,
                        precision=settings.embed_precision)
    generator = None
    if settings.generator_url:
        generator = Generator(settings.generator_url, api_key=settings.generator_api_key, model=settings.generator_model,
                              timeout_s=settings.generator_timeout_s, max_tokens=settings.generator_max_tokens)
        kit.on_stop(generator.close)
    llm_extractor = None
    if settings.generator_url:  # the "llm" entity extractor: same endpoint and key, its own deadline and budget
        extractor_client = ChatClient(settings.generator_url, api_key=settings.generator_api_key,
                                      model=settings.graph_extractor_model or settings.generator_model,
                                      timeout_s=settings.graph_extractor_timeout_s,
                                      max_tokens=settings.graph_extractor_max_tokens)
        kit.on_stop(extractor_client.close)
        llm_extractor = LlmExtractor(extractor_client, concurrency=settings.graph_extractor_concurrency,
                                     document_timeout_s=settings.graph_extractor_document_timeout_s)
    first_stage = None
    if settings.backend == "pgvector":
        first_stage = await asyncio.to_thread(pgvector.PgvectorFirstStage.open, store, embedder, settings)
    searcher = Searcher(store, indexes, embedder, settings, publisher, generator=generator,
                        reranker=load_reranker(settings), first_stage=first_stage)
    servicer = RetrievalServicer(store, indexes, embedder, settings, publisher, searcher, llm_extractor)
    kit.grpc(retrieval_service_pb2_grpc.add_RetrievalServiceServicer_to_server, servicer, SERVICE_NAME)
    kit.expose(store=store, indexes=indexes, servicer=servicer, searcher=searcher, generator=generator)


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
