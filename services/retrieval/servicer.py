"""gRPC servicer of llmo.retrieval.v1.RetrievalService."""

from __future__ import annotations

import asyncio
import hashlib
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format, struct_pb2

from llmo.core import context as ctx
from llmo.core.errors import ServiceError, already_exists, failed_precondition, invalid_argument, not_found
from llmo.core.limits import MAX_ID_LEN, is_identifier, preview
from llmo.core.logging import get_logger
from llmo.core.outbox import Publisher
from llmo.core.pagination import encode_page_token, page_size
from llmo.core.resources import RESOURCE_ID, fingerprint, page_after, parse_name, resource_id, timestamp
from llmo.embedding import EMBEDDING_DIM, Embedder
from llmo.protos.events.v1 import events_pb2
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.protos.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc
from llmo.retrieval import ranking
from llmo.retrieval.chunking import MAX_CHUNK_TOKENS, Chunker
from llmo.retrieval.convert import chunk_proto, struct_of
from llmo.retrieval.extract import ExtractError, extract
from llmo.retrieval.graph.extract import chunk_graphs
from llmo.retrieval.graph.llm import LlmExtractor
from llmo.retrieval.indexes import IndexManager
from llmo.retrieval.quotas import QuotaExceeded, Quotas
from llmo.retrieval.search import Searcher
from llmo.retrieval.settings import RetrievalSettings
from llmo.retrieval.storage import (
    AlreadyExists,
    ChunkRow,
    CollectionRow,
    DocumentRow,
    EtagMismatch,
    NotEmpty,
    RetrievalStore,
    VersionMismatch,
    now_us,
)

log = get_logger(__name__)

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
_MODEL_ALIASES = {"", EMBEDDING_MODEL, f"sentence-transformers/{EMBEDDING_MODEL}"}
DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_OVERLAP = 256, 32
MAX_TEXT_FIELD = 1024
MAX_DESCRIPTION = 16_384
MAX_LABELS = 64
MAX_METADATA_BYTES = 64 * 1024
MAX_ACL_ENTRIES = 256
MAX_GROUPS = 256
MAX_MIME_LEN = 128
MUTABLE = ("display_name", "description", "labels")
IMMUTABLE_ONCE_FILLED = ("embedding_model", "chunking", "knowledge_graph_enabled", "entity_extractor")
ENTITY_EXTRACTORS = ("", "local", "llm")


def collection_id_of(name: str) -> str:
    return parse_name(name, "collections")[0]


def document_name_of(name: str) -> tuple[str, str]:
    collection_id, document_id = parse_name(name, "collections", "documents")
    return collection_id, document_id


def _tenant() -> str:
    return ctx.current_tenant() or ""


def _chunking(config: pb.ChunkingConfig) -> tuple[int, int, int]:
    size, overlap, strategy = config.chunk_size_tokens, config.chunk_overlap_tokens, int(config.strategy)
    if size == 0 and overlap == 0:
        size, overlap = DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_OVERLAP
    size = size or DEFAULT_CHUNK_SIZE
    if not 0 < size <= MAX_CHUNK_TOKENS or not 0 <= overlap < size:
        raise invalid_argument("INVALID_CHUNKING", f"chunk_size_tokens must be in 1..{MAX_CHUNK_TOKENS} and "
                               "chunk_overlap_tokens in 0..chunk_size_tokens-1")
    if strategy not in (0, 1, 2, 3, 4):
        raise invalid_argument("INVALID_CHUNKING", f"unknown chunking strategy {strategy}")
    return size, overlap, strategy or pb.CHUNKING_STRATEGY_RECURSIVE


def _embedding_model(value: str) -> str:
    if value not in _MODEL_ALIASES:
        raise invalid_argument("UNKNOWN_EMBEDDING_MODEL", f"embedding_model must be {EMBEDDING_MODEL!r} (the only "
                               f"one served); got {preview(value)!r}", embedding_model=preview(value))
    return EMBEDDING_MODEL


def _check_collection_fields(c: pb.Collection) -> None:
    if len(c.display_name) > MAX_TEXT_FIELD or len(c.description) > MAX_DESCRIPTION:
        raise invalid_argument("INVALID_COLLECTION", f"display_name is at most {MAX_TEXT_FIELD} characters and "
                               f"description at most {MAX_DESCRIPTION}")
    if len(c.labels) > MAX_LABELS or any(len(k) > 63 or not k or len(v) > 256 for k, v in c.labels.items()):
        raise invalid_argument("INVALID_COLLECTION", f"at most {MAX_LABELS} labels, keys 1..63 and values at most "
                               "256 characters")
    if any("\x00" in t for t in (c.display_name, c.description, *c.labels, *c.labels.values())):
        raise invalid_argument("INVALID_COLLECTION", "text fields may not contain NUL characters")
    _entity_extractor(c)


def _entity_extractor(c: pb.Collection) -> str:
    """The extractor stored for `c`: "local" for a knowledge-graph collection that names none."""
    if c.entity_extractor not in ENTITY_EXTRACTORS:
        raise invalid_argument("INVALID_ENTITY_EXTRACTOR", f"entity_extractor must be one of \"\", \"local\" or "
                               f"\"llm\"; got {preview(c.entity_extractor)!r}", entity_extractor=preview(c.entity_extractor))
    return c.entity_extractor or ("local" if c.knowledge_graph_enabled else "")


def collection_proto(row: CollectionRow) -> pb.Collection:
    return pb.Collection(
        name=f"collections/{row.collection_id}", display_name=row.display_name, description=row.description,
        embedding_model=row.embedding_model, embedding_dimensions=EMBEDDING_DIM,
        chunking=pb.ChunkingConfig(chunk_size_tokens=row.chunk_size, chunk_overlap_tokens=row.chunk_overlap,
                                   strategy=row.strategy),  # type: ignore[arg-type]
        labels=row.labels, tenant=row.tenant, document_count=row.document_count, chunk_count=row.chunk_count,
        create_time=timestamp(row.create_us), update_time=timestamp(row.update_us), etag=row.etag,
        knowledge_graph_enabled=row.knowledge_graph_enabled, entity_extractor=row.entity_extractor)


def _document_proto(collection_id: str, doc: DocumentRow) -> pb.Document:
    name = f"collections/{collection_id}/documents/{doc.document_id}"
    return pb.Document(
        name=name, display_name=doc.display_name, source_uri=doc.source_uri, mime_type=doc.mime_type,
        metadata=struct_of(doc.metadata), access_control=pb.AccessControl(allowed_principals=doc.acl),
        state=pb.DOCUMENT_STATE_READY, chunk_count=doc.chunk_count, size_bytes=doc.size_bytes,
        content_sha256=doc.content_sha256, create_time=timestamp(doc.create_us), update_time=timestamp(doc.update_us),
        version=doc.version, chunks=[chunk_proto(name, doc, c) for c in doc.chunks])


def principals_of(principal: pb.Principal) -> frozenset[str]:
    entries = [principal.subject, *principal.groups]
    if len(principal.groups) > MAX_GROUPS or not all(is_identifier(e) for e in entries if e) or \
            any(not g for g in principal.groups):
        raise invalid_argument("INVALID_PRINCIPAL", f"principal subject and groups are identifiers of at most "
                               f"{MAX_ID_LEN} characters, at most {MAX_GROUPS} groups")
    return frozenset(e for e in entries if e)


class RetrievalServicer(pb_grpc.RetrievalServiceServicer):
    def __init__(self, store: RetrievalStore, indexes: IndexManager, embedder: Embedder,
                 settings: RetrievalSettings, publisher: Publisher | None, searcher: Searcher,
                 llm_extractor: LlmExtractor | None = None) -> None:
        self.store, self.indexes, self.embedder = store, indexes, embedder
        self.settings, self.publisher, self.searcher = settings, publisher, searcher
        # Without a generator, "llm" collections are refused; one made before falls back chunk by chunk.
        self.llm_extractor = llm_extractor or LlmExtractor(None)
        self.quotas = Quotas.of(settings)

    def _check_extractor_available(self, extractor: str) -> None:
        if extractor == "llm" and self.llm_extractor.client is None:
            raise failed_precondition("GENERATOR_UNAVAILABLE", "entity_extractor \"llm\": this service runs without "
                                      "a generator (LLMO_RETRIEVAL_GENERATOR_URL and LLMO_ROUTER_HTTP_URL are empty)",
                                      field="entity_extractor")

    async def _collection(self, name: str, *, counts: bool = True) -> CollectionRow:
        cid = collection_id_of(name)
        row = await asyncio.to_thread(self.store.get_collection, _tenant(), cid, counts=counts)
        if row is None:  # another tenant's collection reads exactly like a missing one
            raise not_found("COLLECTION_NOT_FOUND", f"collection {name} not found", name=name)
        return row

    # --- collections ---------------------------------------------------------------------------

    async def CreateCollection(self, request: pb.CreateCollectionRequest, context: Any) -> pb.CreateCollectionResponse:
        cid = resource_id(request.collection_id, "INVALID_COLLECTION_ID", "collection_id")
        c = request.collection
        _check_collection_fields(c)
        size, overlap, strategy = _chunking(c.chunking)
        model = _embedding_model(c.embedding_model)
        if len(request.request_id) > MAX_ID_LEN:
            raise invalid_argument("INVALID_REQUEST_ID", f"request_id is at most {MAX_ID_LEN} characters")
        self._check_extractor_available(c.entity_extractor)
        stamp = now_us()
        row = CollectionRow(pk=0, uid=uuid.uuid4().hex, tenant=_tenant(), collection_id=cid,
                            display_name=c.display_name, description=c.description, labels=dict(c.labels),
                            embedding_model=model, chunk_size=size, chunk_overlap=overlap, strategy=strategy,
                            etag=uuid.uuid4().hex[:16], create_request_id=request.request_id, generation=1,
                            create_us=stamp, update_us=stamp, knowledge_graph_enabled=c.knowledge_graph_enabled,
                            entity_extractor=_entity_extractor(c))
        try:
            created = await asyncio.to_thread(self.store.create_collection, row)
        except AlreadyExists:
            raise already_exists("COLLECTION_ALREADY_EXISTS", f"collection collections/{cid} already exists",
                                 name=f"collections/{cid}") from None
        return pb.CreateCollectionResponse(collection=collection_proto(created))

    async def GetCollection(self, request: pb.GetCollectionRequest, context: Any) -> pb.GetCollectionResponse:
        return pb.GetCollectionResponse(collection=collection_proto(await self._collection(request.name)))

    async def ListCollections(self, request: pb.ListCollectionsRequest, context: Any) -> pb.ListCollectionsResponse:
        size = page_size(request.page_size)
        query = fingerprint(request, "page_token", "page_size")
        after = page_after(request.page_token, query)
        rows = await asyncio.to_thread(self.store.list_collections, _tenant(), after, size + 1)
        token = encode_page_token({"after": rows[size - 1].collection_id}, query=query) if len(rows) > size else ""
        return pb.ListCollectionsResponse(collections=[collection_proto(r) for r in rows[:size]], next_page_token=token)

    async def UpdateCollection(self, request: pb.UpdateCollectionRequest, context: Any) -> pb.UpdateCollectionResponse:
        c = request.collection
        cid = collection_id_of(c.name)
        paths = list(request.update_mask.paths) or list(MUTABLE)
        unknown = [p for p in paths if p not in (*MUTABLE, *IMMUTABLE_ONCE_FILLED)]
        if unknown:
            raise invalid_argument("INVALID_UPDATE_MASK", f"update_mask may name {', '.join(MUTABLE)}, "
                                   f"{', '.join(IMMUTABLE_ONCE_FILLED)}; got {preview(unknown[0])!r}")
        _check_collection_fields(c)
        changes: dict[str, Any] = {}
        for path in paths:
            if path == "labels":
                changes["labels"] = dict(c.labels)
            elif path == "embedding_model":
                changes["embedding_model"] = _embedding_model(c.embedding_model)
            elif path == "chunking":
                changes["chunk_size"], changes["chunk_overlap"], changes["strategy"] = _chunking(c.chunking)
            elif path in ("knowledge_graph_enabled", "entity_extractor"):
                changes["knowledge_graph_enabled"] = c.knowledge_graph_enabled
                changes["entity_extractor"] = _entity_extractor(c)
            elif path in MUTABLE:
                changes[path] = getattr(c, path)
        if len(c.etag) > MAX_ID_LEN:
            raise invalid_argument("INVALID_ETAG", "etag is malformed")
        self._check_extractor_available(changes.get("entity_extractor", ""))
        try:
            row = await asyncio.to_thread(
                self.store.update_collection, _tenant(), cid, changes, c.etag, uuid.uuid4().hex[:16],
                needs_empty=any(p in IMMUTABLE_ONCE_FILLED for p in paths))
        except EtagMismatch:
            raise ServiceError(grpc.StatusCode.ABORTED, "ETAG_MISMATCH", "the collection changed since it was read"
                               ) from None
        except NotEmpty:
            raise failed_precondition("COLLECTION_NOT_EMPTY", f"{', '.join(IMMUTABLE_ONCE_FILLED)} cannot change "
                                      "once the collection holds documents") from None
        if row is None:
            raise not_found("COLLECTION_NOT_FOUND", f"collection {c.name} not found", name=c.name)
        return pb.UpdateCollectionResponse(collection=collection_proto(row))

    async def DeleteCollection(self, request: pb.DeleteCollectionRequest, context: Any) -> pb.DeleteCollectionResponse:
        cid = collection_id_of(request.name)
        if len(request.etag) > MAX_ID_LEN:
            raise invalid_argument("INVALID_ETAG", "etag is malformed")
        try:
            row = await asyncio.to_thread(self.store.delete_collection, _tenant(), cid, force=request.force,
                                          etag=request.etag)
        except EtagMismatch:
            raise ServiceError(grpc.StatusCode.ABORTED, "ETAG_MISMATCH", "the collection changed since it was read"
                               ) from None
        except NotEmpty:
            raise failed_precondition("COLLECTION_NOT_EMPTY", "the collection holds documents; set force to delete "
                                      "them too") from None
        if row is None:
            raise not_found("COLLECTION_NOT_FOUND", f"collection {request.name} not found", name=request.name)
        await asyncio.to_thread(self.indexes.drop, row.uid)
        return pb.DeleteCollectionResponse()

    # --- documents ---------------------------------------------------------------------------

    async def _document_of(self, name: str) -> tuple[CollectionRow, str]:
        cid, did = document_name_of(name)
        return await self._collection(f"collections/{cid}"), did

    async def GetDocument(self, request: pb.GetDocumentRequest, context: Any) -> pb.GetDocumentResponse:
        coll, did = await self._document_of(request.name)
        doc = await asyncio.to_thread(self.store.get_document, coll.pk, did,
                                      with_chunks=request.view == pb.DOCUMENT_VIEW_FULL)
        if doc is None:
            raise not_found("DOCUMENT_NOT_FOUND", f"document {request.name} not found", name=request.name)
        return pb.GetDocumentResponse(document=_document_proto(coll.collection_id, doc))

    async def ListDocuments(self, request: pb.ListDocumentsRequest, context: Any) -> pb.ListDocumentsResponse:
        coll = await self._collection(request.parent)
        size = page_size(request.page_size)
        matches = ranking.compile_filters(request.filters)
        state = int(request.state)
        if state not in range(0, 5):
            raise invalid_argument("INVALID_FILTER", f"unknown document state {state}")
        query = fingerprint(request, "page_token", "page_size")
        after = page_after(request.page_token, query)
        if state not in (pb.DOCUMENT_STATE_UNSPECIFIED, pb.DOCUMENT_STATE_READY):
            return pb.ListDocumentsResponse()  # only searchable documents are stored; failed ones are reported at ingest

        def page() -> tuple[list[DocumentRow], bool]:
            found: list[DocumentRow] = []
            for doc in self.store.iter_documents(coll.pk, after):
                if matches(doc.metadata):
                    if len(found) == size:
                        return found, True
                    found.append(doc)
            return found, False

        docs, more = await asyncio.to_thread(page)
        token = encode_page_token({"after": docs[-1].document_id}, query=query) if more else ""
        return pb.ListDocumentsResponse(documents=[_document_proto(coll.collection_id, d) for d in docs],
                                        next_page_token=token)

    async def DeleteDocument(self, request: pb.DeleteDocumentRequest, context: Any) -> pb.DeleteDocumentResponse:
        coll, did = await self._document_of(request.name)
        if not await asyncio.to_thread(self.store.delete_document, coll.pk, did):
            raise not_found("DOCUMENT_NOT_FOUND", f"document {request.name} not found", name=request.name)
        return pb.DeleteDocumentResponse()

    async def UpdateDocumentAccess(self, request: pb.UpdateDocumentAccessRequest, context: Any
                                   ) -> pb.UpdateDocumentAccessResponse:
        document_name_of(request.name)
        if not request.HasField("access_control"):
            raise invalid_argument("INVALID_ACCESS_CONTROL", "access_control is required; send it with no "
                                   "allowed_principals to make the document readable by every principal of the tenant",
                                   field="access_control")
        acl = list(request.access_control.allowed_principals)
        problem = _acl_problem(acl)
        if problem is not None:
            raise invalid_argument("INVALID_ACCESS_CONTROL", problem, field="access_control.allowed_principals",
                                   max_entries=MAX_ACL_ENTRIES, max_length=MAX_ID_LEN)
        if request.expected_version < 0:
            raise invalid_argument("INVALID_EXPECTED_VERSION", "expected_version is a document version (>= 1) or 0 "
                                   "for none", field="expected_version")
        coll, did = await self._document_of(request.name)
        try:
            doc, changed = await asyncio.to_thread(self.store.update_document_access, coll.pk, did, acl,
                                                   request.expected_version)
        except VersionMismatch:
            raise ServiceError(grpc.StatusCode.ABORTED, "VERSION_MISMATCH", f"document {request.name} is no longer "
                               f"at version {request.expected_version}; read it again") from None
        if doc is None:
            raise not_found("DOCUMENT_NOT_FOUND", f"document {request.name} not found", name=request.name)
        if changed:
            await self._publish_ingested(coll, request.name, doc.chunk_count, doc.version)
        return pb.UpdateDocumentAccessResponse(document=_document_proto(coll.collection_id, doc))

    # --- ingestion -----------------------------------------------------------------------------

    async def IngestDocuments(self, request_iterator: AsyncIterator[Any], context: Any
                              ) -> AsyncIterator[pb.IngestDocumentsResponse]:
        iterator = aiter(request_iterator)
        first = await anext(iterator, None)
        _decoded(first)
        if first is None or not first.HasField("config"):
            raise invalid_argument("MISSING_INGEST_CONFIG", "the first request of the stream must carry `config`")
        coll = await self._collection(first.config.collection)
        reindex = first.config.reindex_unchanged
        summary = pb.IngestSummary()
        position = 0
        async for request in iterator:
            _decoded(request)
            if request.HasField("config"):
                raise invalid_argument("DUPLICATE_INGEST_CONFIG", "only the first request of the stream carries `config`")
            summary.documents_received += 1
            last = None
            async for progress in self._ingest_one(coll, position, request.document, reindex):
                last = progress
                yield pb.IngestDocumentsResponse(progress=progress)
            position += 1
            if last is None:
                continue
            if last.stage == pb.INGEST_STAGE_INDEXED:
                summary.documents_indexed += 1
                summary.chunks_indexed += last.chunks
                summary.graph_fallback_chunks += last.graph_fallback_chunks
            elif last.stage == pb.INGEST_STAGE_SKIPPED:
                summary.documents_skipped += 1
            else:
                summary.documents_failed += 1
        yield pb.IngestDocumentsResponse(summary=summary)

    async def _ingest_one(self, coll: CollectionRow, position: int, doc: pb.DocumentInput, reindex: bool
                          ) -> AsyncIterator[pb.DocumentProgress]:
        did = doc.document_id or str(uuid.uuid4())
        if not RESOURCE_ID.match(did):
            yield _failed(position, "", "INVALID_DOCUMENT_ID", f"document_id must match [a-z0-9][a-z0-9-]{{0,62}}; "
                          f"got {preview(did)!r}")
            return
        name = f"collections/{coll.collection_id}/documents/{did}"
        yield pb.DocumentProgress(index=position, document=name, stage=pb.INGEST_STAGE_RECEIVED)
        source = doc.WhichOneof("source")
        raw = doc.content if source == "content" else doc.text.encode("utf-8")
        problem = self._check_input(doc, raw)
        if problem is not None:
            yield _failed(position, name, *problem)
            return
        if not raw.strip():
            yield _failed(position, name, "EMPTY_CONTENT", "the document has no content")
            return
        row = DocumentRow(document_id=did, content_sha256=hashlib.sha256(raw).hexdigest(), size_bytes=len(raw),
                          mime_type="", display_name=doc.display_name, source_uri=doc.source_uri,
                          metadata=json_format.MessageToDict(doc.metadata), acl=list(doc.access_control.allowed_principals))
        try:
            extracted = await asyncio.to_thread(
                extract, doc.mime_type, **({"content": doc.content} if source == "content" else {"text": doc.text}))
        except ExtractError as error:
            yield _failed(position, name, error.reason, error.message)
            return
        row.mime_type = extracted.mime_type
        previous = await asyncio.to_thread(self.store.get_document, coll.pk, did)
        if previous is not None and previous.content_sha256 == row.content_sha256 and not reindex:
            same = (previous.metadata, previous.acl, previous.display_name, previous.source_uri, previous.mime_type) == \
                   (row.metadata, row.acl, row.display_name, row.source_uri, row.mime_type)
            if same:
                yield pb.DocumentProgress(index=position, document=name, stage=pb.INGEST_STAGE_SKIPPED,
                                          chunks=previous.chunk_count)
                return
            version = await asyncio.to_thread(self.store.update_document_fields, coll.pk, row)
            yield await self._indexed(coll, position, name, previous.chunk_count, version)
            return
        if not extracted.text.strip():
            yield _failed(position, name, "EMPTY_CONTENT", "no text could be extracted from the document")
            return
        chunker = Chunker(coll.chunk_size, coll.chunk_overlap, coll.strategy)
        pieces = await asyncio.to_thread(chunker.split, extracted)
        if not pieces:
            yield _failed(position, name, "EMPTY_CONTENT", "the document's text has no tokens")
            return
        if len(pieces) > self.settings.max_chunks_per_document:
            yield _failed(position, name, "DOCUMENT_TOO_LARGE", f"the document makes {len(pieces)} chunks; the limit "
                          f"is {self.settings.max_chunks_per_document}")
            return
        over = await asyncio.to_thread(self.quotas.check, self.store, coll.tenant, coll.pk, did, len(pieces)) \
            if self.quotas.enabled else None
        if over is not None:
            yield _failed(position, name, "INGEST_QUOTA_EXCEEDED", over)
            return
        yield pb.DocumentProgress(index=position, document=name, stage=pb.INGEST_STAGE_CHUNKED, chunks=len(pieces))
        try:
            vectors = await asyncio.to_thread(self.embedder.encode, [p.text for p in pieces])
        except (RuntimeError, ValueError, OSError) as error:
            log.warning("embedding failed", document=name, error=repr(error))
            yield _failed(position, name, "EMBEDDING_FAILED", "the chunks could not be embedded")
            return
        yield pb.DocumentProgress(index=position, document=name, stage=pb.INGEST_STAGE_EMBEDDED, chunks=len(pieces))
        row.chunks = [ChunkRow(idx=i, text=p.text, heading_path=list(p.heading_path), start_offset=p.start,
                               end_offset=p.end, token_count=p.token_count,
                               embedding=np.asarray(v, dtype=np.float32).tobytes())
                      for i, (p, v) in enumerate(zip(pieces, vectors, strict=True))]
        fallbacks = 0
        if coll.knowledge_graph_enabled:  # written with the chunks, in their transaction
            spans = [(p.start, p.end) for p in pieces]
            if coll.entity_extractor == "llm":
                found = await self.llm_extractor.chunk_graphs(extracted.text, spans, tenant=coll.tenant,
                                                              purpose=f"graph_extract:{position}")
                graphs, fallbacks = found.graphs, found.fallback_chunks
            else:
                graphs = await asyncio.to_thread(chunk_graphs, extracted.text, spans)
            for chunk, graph in zip(row.chunks, graphs, strict=True):
                chunk.graph = graph
        guard = self.quotas.guard(self.store, coll.tenant, coll.pk, did, len(pieces))
        try:
            version = await asyncio.to_thread(self.store.replace_document, coll.pk, row, guard)
        except QuotaExceeded as exceeded:  # another stream filled the quota since the check above
            yield _failed(position, name, "INGEST_QUOTA_EXCEEDED", exceeded.message)
            return
        progress = await self._indexed(coll, position, name, len(pieces), version)
        if progress.stage == pb.INGEST_STAGE_INDEXED:
            progress.graph_fallback_chunks = fallbacks
        yield progress

    def _check_input(self, doc: pb.DocumentInput, raw: bytes) -> tuple[str, str] | None:
        if len(raw) > self.settings.max_document_bytes:
            return "DOCUMENT_TOO_LARGE", f"the document is {len(raw)} bytes; the limit is {self.settings.max_document_bytes}"
        if len(doc.display_name) > MAX_TEXT_FIELD or len(doc.source_uri) > MAX_TEXT_FIELD or len(doc.mime_type) > MAX_MIME_LEN:
            return "INVALID_DOCUMENT", f"display_name and source_uri are at most {MAX_TEXT_FIELD} characters, " \
                                       f"mime_type at most {MAX_MIME_LEN}"
        if "\x00" in doc.display_name or "\x00" in doc.source_uri:
            return "INVALID_DOCUMENT", "display_name and source_uri may not contain NUL characters"
        if doc.metadata.ByteSize() > MAX_METADATA_BYTES:
            return "INVALID_DOCUMENT", f"metadata is at most {MAX_METADATA_BYTES} bytes serialized"
        acl_problem = _acl_problem(doc.access_control.allowed_principals)
        if acl_problem is not None:
            return "INVALID_DOCUMENT", acl_problem
        if _has_non_finite(doc.metadata):
            return "INVALID_DOCUMENT", "metadata numbers must be finite"
        return None

    async def _indexed(self, coll: CollectionRow, position: int, name: str, chunks: int, version: int | None
                       ) -> pb.DocumentProgress:
        if version is None:
            return _failed(position, name, "COLLECTION_NOT_FOUND", "the collection was deleted during the ingest")
        await self._publish_ingested(coll, name, chunks, version)
        return pb.DocumentProgress(index=position, document=name, stage=pb.INGEST_STAGE_INDEXED, chunks=chunks)

    async def _publish_ingested(self, coll: CollectionRow, name: str, chunks: int, version: int) -> None:
        """`document_ingested` for a new version of a document (new content, metadata or access list)."""
        if self.publisher is not None:
            event = events_pb2.DocumentIngested(document=name, chunks=chunks, tenant=coll.tenant)
            event.occurred_at.GetCurrentTime()
            await self.publisher.publish(event, event_id=f"retrieval-ingested:{coll.uid}:{name}:v{version}")

    # --- search --------------------------------------------------------------------------------

    async def Search(self, request: pb.SearchRequest, context: Any) -> pb.SearchResponse:
        collection_id_of(request.collection)
        self.searcher.check(request)
        principals = principals_of(request.principal)
        coll = await self._collection(request.collection, counts=False)  # a search reads no counts
        return await self.searcher.search(request, coll, principals)


def _acl_problem(acl: Any) -> str | None:
    """Why an access list is out of bounds (the same for ingestion and UpdateDocumentAccess), or None."""
    if len(acl) > MAX_ACL_ENTRIES or not all(is_identifier(p) for p in acl):
        return f"access_control lists at most {MAX_ACL_ENTRIES} principals, each an identifier of at most " \
               f"{MAX_ID_LEN} characters"
    return None


def _failed(position: int, name: str, reason: str, message: str) -> pb.DocumentProgress:
    return pb.DocumentProgress(index=position, document=name, stage=pb.INGEST_STAGE_FAILED, error_reason=reason,
                               error_message=message[:512])


def _decoded(request: Any) -> None:
    if request is not None and not isinstance(request, pb.IngestDocumentsRequest):
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PROTOBUF",
                           "a request of the stream is not a valid protobuf message (string fields must be UTF-8)")


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, struct_pb2.Struct):
        return any(_has_non_finite(v) for v in value.fields.values())
    if isinstance(value, struct_pb2.ListValue):
        return any(_has_non_finite(v) for v in value.values)
    if isinstance(value, struct_pb2.Value):
        kind = value.WhichOneof("kind")
        if kind == "number_value":
            return not math.isfinite(value.number_value)
        if kind in ("struct_value", "list_value"):
            return _has_non_finite(getattr(value, kind))
    return False
