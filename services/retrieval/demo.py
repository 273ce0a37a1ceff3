"""`make demo` step of the retrieval service: as the first tenant, ingest Markdown, HTML and plain text
(one document readable only by `group:finance`) into a fresh collection, search it in every mode as a
member of that group and as an outsider, run the whole pipeline once (query expansion with chat
history and HyDE through the router when it runs, rerank, reorder, compression) with its stage
latencies, check the second tenant cannot see the collection, delete it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence

import grpc
from rich.console import RenderableType
from rich.table import Table

from llmo.core.client import create_channel, outgoing_metadata
from llmo.core.errors import error_info
from llmo.protos.common.v1 import common_pb2
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.protos.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc

RESTRICTED_GROUP = "group:finance"
RESTRICTED_DOC = "q3-budget"
QUERY = "travel budget and expense limits for the quarter"
MEMBER = pb.Principal(subject="user:alice", groups=[RESTRICTED_GROUP])
OUTSIDER = pb.Principal(subject="user:bob", groups=["group:engineering"])
# Ingest embeds with MiniLM, loaded on the service's first ingest (seconds on a cold start).
INGEST_TIMEOUT_S = 180.0
CALL_TIMEOUT_S = 30.0
# The generator (the router -> inference's demo model) may be slow on a cold CPU: the search
# falls back to the plain query past the service's generator timeout, well inside this.
PIPELINE_TIMEOUT_S = 60.0
HISTORY = [pb.ConversationTurn(role="user", content="What do the travel rules say?"),
           pb.ConversationTurn(role="assistant", content="Trains for short trips, flights need approval.")]
FOLLOW_UP = "And what is the spending limit this quarter?"

HANDBOOK_MD = """# Employee handbook

## Travel

Book trains for trips under four hours. Flights need a manager's approval before booking.

## Expenses

Submit receipts within thirty days. Meals are reimbursed up to the daily expense limit.
"""

STATUS_HTML = """<html><head><title>Platform status</title></head><body>
<nav><a href="/">Home</a> | <a href="/login">Log in</a></nav>
<article><h1>Platform status</h1>
<p>All inference regions are operational and search latency is within its objective.</p>
<h2>Maintenance window</h2>
<p>The database upgrade runs on Saturday night; ingestion pauses for about ten minutes.</p></article>
<footer>Copyright footer text</footer></body></html>"""

FAQ_TXT = ("Travel questions go to the office manager. The expense tool accepts photos of receipts. "
           "Quarterly planning starts two weeks before the quarter ends.")

BUDGET_MD = """# Q3 budget forecast

## Travel

The travel budget for the quarter is capped at 120,000 dollars; the per-trip expense limit rises to 2,500.

## Headcount

Finance approves four new hires for the quarter.
"""


def _documents() -> list[pb.DocumentInput]:
    return [
        pb.DocumentInput(document_id="handbook", display_name="Employee handbook", mime_type="text/markdown",
                         text=HANDBOOK_MD),
        pb.DocumentInput(document_id="status-page", display_name="Platform status", mime_type="text/html",
                         source_uri="https://status.example.com/", content=STATUS_HTML.encode()),
        pb.DocumentInput(document_id="faq", display_name="Office FAQ", mime_type="text/plain", text=FAQ_TXT),
        pb.DocumentInput(document_id=RESTRICTED_DOC, display_name="Q3 budget forecast", mime_type="text/markdown",
                         text=BUDGET_MD, access_control=pb.AccessControl(allowed_principals=[RESTRICTED_GROUP])),
    ]


def _doc_id(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _who(principal: pb.Principal) -> str:
    return f"{principal.subject} ({', '.join(principal.groups)})"


def _snippet(text: str, width: int = 48) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def results_table(title: str, reply: pb.SearchResponse) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("document", no_wrap=True)
    table.add_column("heading path")
    table.add_column("score", justify="right")
    table.add_column("snippet")
    for result in reply.results:
        chunk = result.chunk
        table.add_row(_doc_id(chunk.document), " › ".join(chunk.heading_path) or "-", f"{result.score:.4f}",
                      _snippet(chunk.text))
    return table


async def _ingest(stub: pb_grpc.RetrievalServiceStub, collection: str, docs: Sequence[pb.DocumentInput],
                  metadata: list[tuple[str, str]]) -> tuple[dict[int, pb.DocumentProgress], pb.IngestSummary]:
    async def requests() -> AsyncIterator[pb.IngestDocumentsRequest]:
        yield pb.IngestDocumentsRequest(config=pb.IngestConfig(collection=collection))
        for doc in docs:
            yield pb.IngestDocumentsRequest(document=doc)

    final: dict[int, pb.DocumentProgress] = {}
    summary: pb.IngestSummary | None = None
    async for response in stub.IngestDocuments(requests(), metadata=metadata, timeout=INGEST_TIMEOUT_S):
        if response.HasField("progress"):
            final[response.progress.index] = response.progress
        else:
            summary = response.summary
    if summary is None:
        raise RuntimeError("retrieval: the ingest stream ended without a summary")
    return final, summary


async def _search(stub: pb_grpc.RetrievalServiceStub, collection: str, principal: pb.Principal,
                  metadata: list[tuple[str, str]], mode: pb.SearchMode = pb.SEARCH_MODE_HYBRID,
                  ) -> pb.SearchResponse:
    return await stub.Search(pb.SearchRequest(collection=collection, query=QUERY, top_k=5, mode=mode,
                                              principal=principal), metadata=metadata, timeout=CALL_TIMEOUT_S)


def _check_acl(mode: str, member: pb.SearchResponse, outsider: pb.SearchResponse) -> None:
    if RESTRICTED_DOC not in {_doc_id(r.chunk.document) for r in member.results}:
        raise RuntimeError(f"retrieval: {mode} search as {_who(MEMBER)} did not find {RESTRICTED_DOC}")
    if RESTRICTED_DOC in {_doc_id(r.chunk.document) for r in outsider.results}:
        raise RuntimeError(f"retrieval: {mode} search as {_who(OUTSIDER)} returned {RESTRICTED_DOC}, "
                           f"restricted to {RESTRICTED_GROUP}")


def _pipeline_request(collection: str, principal: pb.Principal, generate: bool) -> pb.SearchRequest:
    request = pb.SearchRequest(collection=collection, query=FOLLOW_UP, top_k=4, principal=principal, history=HISTORY,
                               rerank=pb.RerankOptions(enabled=True), reorder=pb.ReorderOptions(enabled=True),
                               compression=pb.CompressionOptions(enabled=True, max_tokens=60),
                               attribution=common_pb2.Attribution(application="make-demo", user=principal.subject))
    if generate:
        request.query_expansion.enabled, request.query_expansion.variants = True, 2
        request.hyde.enabled = True
    return request


def stages_table(reply: pb.SearchResponse) -> Table:
    table = Table(title=f"stages ({reply.latency_ms:.1f} ms in all; reranker {reply.reranker_version or '-'})",
                  title_justify="left")
    for column in ("stage", "ms", "items", "fell back"):
        table.add_column(column, justify="right" if column in ("ms", "items") else "left")
    for stage in reply.stages:
        table.add_row(stage.stage, f"{stage.latency_ms:.1f}", str(stage.items),
                      stage.fallback_reason if stage.fell_back else "")
    return table


async def _pipeline(stub: pb_grpc.RetrievalServiceStub, collection: str, metadata: list[tuple[str, str]],
                    generate: bool) -> list[RenderableType]:
    lines: list[RenderableType] = []
    member = await stub.Search(_pipeline_request(collection, MEMBER, generate), metadata=metadata,
                               timeout=PIPELINE_TIMEOUT_S)
    outsider = await stub.Search(_pipeline_request(collection, OUTSIDER, generate), metadata=metadata,
                                 timeout=PIPELINE_TIMEOUT_S)
    how = "expansion with history + HyDE through the router, " if generate else ""
    lines.append(f"retrieval: full pipeline ({how}rerank, reorder, compression to 60 tokens) for the follow-up "
                 f"{FOLLOW_UP!r} as {MEMBER.subject}")
    if member.expanded_queries:
        lines.append("retrieval: searched also " + "; ".join(repr(q) for q in member.expanded_queries))
    lines.append(results_table("results (reordered: strongest at both ends)", member))
    lines.append(stages_table(member))
    lines.append(f"retrieval: compressed context ({len(member.compressed_context)} chars): "
                 f"{_snippet(member.compressed_context, 160)!r}")
    if generate:
        lines.append(f"retrieval: generator tokens {member.usage.input_tokens} in / {member.usage.output_tokens} out, "
                     "metered by the router to the searching tenant")
    leaked = RESTRICTED_DOC in {_doc_id(r.chunk.document) for r in outsider.results} \
        or "120,000" in outsider.compressed_context
    if leaked:
        raise RuntimeError(f"retrieval: the pipeline as {OUTSIDER.subject} surfaced {RESTRICTED_DOC}")
    lines.append(f"retrieval: the same pipeline as {OUTSIDER.subject}: {len(outsider.results)} results, "
                 f"nothing from {RESTRICTED_DOC} in results or compressed context")
    return lines


async def _not_found_for(call: Awaitable[object], what: str) -> str:
    """The reason of the NOT_FOUND `call` must end with; RuntimeError for any other outcome."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        reason = info.reason if info else ""
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise RuntimeError(f"retrieval: {what} got {error.code().name} {reason}, expected NOT_FOUND") from error
        return reason
    raise RuntimeError(f"retrieval: {what} succeeded; another tenant's collection must read as NOT_FOUND")


async def _foreign_tenant_sees_nothing(stub: pb_grpc.RetrievalServiceStub, collection: str, tenant: str,
                                       key: str) -> str:
    metadata = outgoing_metadata(key or None)
    get = await _not_found_for(stub.GetCollection(pb.GetCollectionRequest(name=collection), metadata=metadata,
                                                  timeout=CALL_TIMEOUT_S), f"{tenant} reading {collection}")
    search = await _not_found_for(_search(stub, collection, MEMBER, metadata), f"{tenant} searching {collection}")
    return f"retrieval: {tenant} on {collection}: GetCollection NOT_FOUND {get}, Search NOT_FOUND {search}"


async def run_demo(endpoints: dict[str, str], *, tenants: Mapping[str, str] | None = None,
                   admin_key: str = "") -> list[RenderableType]:
    """`tenants` maps end tenants to API keys (empty: API keys off); the first one owns the collection."""
    lines: list[RenderableType] = []
    keyed = list((tenants or {}).items())
    tenant, key = keyed[0] if keyed else ("", "")
    metadata = outgoing_metadata(key or None)
    collection_id = f"demo-{uuid.uuid4().hex[:8]}"
    async with create_channel(endpoints["retrieval"]) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        created = (await stub.CreateCollection(pb.CreateCollectionRequest(
            collection_id=collection_id, request_id=str(uuid.uuid4()),
            collection=pb.Collection(display_name="make demo", chunking=pb.ChunkingConfig(
                chunk_size_tokens=64, chunk_overlap_tokens=8, strategy=pb.CHUNKING_STRATEGY_HEADING))),
            metadata=metadata, timeout=CALL_TIMEOUT_S)).collection
        name = created.name
        lines.append(f"retrieval: created {name}" + (f" as {tenant}" if tenant else "")
                     + f" ({created.embedding_model}, {created.embedding_dimensions} dims, heading chunking)")
        try:
            docs = _documents()
            progress, summary = await _ingest(stub, name, docs, metadata)
            for index, doc in enumerate(docs):
                final = progress.get(index)
                stage = pb.IngestStage.Name(final.stage).removeprefix("INGEST_STAGE_") if final else "NO PROGRESS"
                acl = f", readable by {', '.join(doc.access_control.allowed_principals)}" \
                    if doc.access_control.allowed_principals else ""
                chunks = final.chunks if final else 0
                lines.append(f"retrieval: ingested {doc.document_id} ({doc.mime_type}{acl}): {stage}, "
                             f"{chunks} chunk{'' if chunks == 1 else 's'}"
                             + (f" [{final.error_reason}]" if final and final.error_reason else ""))
            lines.append(f"retrieval: ingest summary: {summary.documents_received} received, "
                         f"{summary.documents_indexed} indexed, {summary.documents_skipped} skipped, "
                         f"{summary.documents_failed} failed, {summary.chunks_indexed} chunks")
            if summary.documents_indexed != len(docs):
                raise RuntimeError(f"retrieval: {summary.documents_indexed} of {len(docs)} documents indexed")

            member = await _search(stub, name, MEMBER, metadata)
            outsider = await _search(stub, name, OUTSIDER, metadata)
            lines.append(f"retrieval: hybrid search {QUERY!r}")
            for principal, reply in ((MEMBER, member), (OUTSIDER, outsider)):
                lines.append(results_table(f"as {_who(principal)}: {reply.candidates_considered} readable chunks "
                                           "considered", reply))
            _check_acl("hybrid", member, outsider)
            for mode in (pb.SEARCH_MODE_SPARSE, pb.SEARCH_MODE_DENSE):
                label = pb.SearchMode.Name(mode).removeprefix("SEARCH_MODE_").lower()
                as_member = await _search(stub, name, MEMBER, metadata, mode)
                as_outsider = await _search(stub, name, OUTSIDER, metadata, mode)
                _check_acl(label, as_member, as_outsider)
                top = [f"{_doc_id(r.chunk.document)} {r.score:.3f}" for r in as_member.results[:3]]
                lines.append(f"retrieval: {label} top 3 as {MEMBER.subject}: {', '.join(top)}; "
                             f"as {OUTSIDER.subject}: {len(as_outsider.results)} results, none from {RESTRICTED_DOC}")
            lines.append(f"retrieval: {RESTRICTED_DOC} (restricted to {RESTRICTED_GROUP}) is visible to "
                         f"{MEMBER.subject} only, in every mode")
            lines += await _pipeline(stub, name, metadata, generate="router_http" in endpoints)
            if len(keyed) > 1:
                lines.append(await _foreign_tenant_sees_nothing(stub, name, *keyed[1]))
        finally:
            await stub.DeleteCollection(pb.DeleteCollectionRequest(name=name, force=True), metadata=metadata,
                                        timeout=CALL_TIMEOUT_S)
        lines.append(f"retrieval: deleted {name}")
    return lines
