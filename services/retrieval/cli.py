"""`llmo retrieval ...`: collections, ingestion, search and evaluation against a running retrieval
service over gRPC."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
from google.protobuf import json_format, struct_pb2
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmo.cli import service_client
from llmo.cli.service_client import call_service
from llmo.core.settings import DEFAULT_GRPC_PORTS
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.protos.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc

T = TypeVar("T")
Action = Callable[[pb_grpc.RetrievalServiceStub, list[tuple[str, str]]], Awaitable[T]]

MIME_BY_SUFFIX = {
    ".txt": "text/plain",
    ".text": "text/plain",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".html": "text/html",
    ".htm": "text/html",
    ".pdf": "application/pdf",
}
MODES = {
    "sparse": pb.SEARCH_MODE_SPARSE,
    "dense": pb.SEARCH_MODE_DENSE,
    "hybrid": pb.SEARCH_MODE_HYBRID,
    "graph": pb.SEARCH_MODE_KNOWLEDGE_GRAPH,
}
CHUNKING = {
    "fixed": pb.CHUNKING_STRATEGY_FIXED,
    "sentence": pb.CHUNKING_STRATEGY_SENTENCE,
    "recursive": pb.CHUNKING_STRATEGY_RECURSIVE,
    "heading": pb.CHUNKING_STRATEGY_HEADING,
}
TERMINAL = (pb.INGEST_STAGE_INDEXED, pb.INGEST_STAGE_SKIPPED, pb.INGEST_STAGE_FAILED)
CALL_TIMEOUT_S = 60.0  # the service loads MiniLM on its first search (seconds on a cold start)
MAX_QUERY_CHARS = 4096  # the service's default LLMO_RETRIEVAL_MAX_QUERY_CHARS
SNIPPET_CHARS = 160

out = Console()
err = Console(stderr=True)


# --- connection -----------------------------------------------------------------------------


def default_endpoint() -> str:
    """The retrieval service of the stack `llmo up` runs in the data directory, else the default port."""
    return service_client.default_endpoint("retrieval")


def _call(obj: dict[str, Any], action: Action[T]) -> T:
    """Run one action against the service; a failed call becomes a one-line error (exit 1)."""
    return call_service("retrieval", obj["endpoint"], obj["api_key"], pb_grpc.RetrievalServiceStub, action)


def _collection_name(value: str) -> str:
    return value if value.startswith("collections/") else f"collections/{value}"


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _progress(as_json: bool) -> Progress:
    """A bar on stderr for people at a terminal; nothing in --json mode or when stderr is not a terminal."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[extra]}"),
        TimeElapsedColumn(),
        console=err,
        disable=as_json or not err.is_terminal,
    )


def _scalar(text: str) -> Any:
    """`key=value` values: JSON numbers, true, false and null as such, anything else as a string."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if value is None or isinstance(value, bool | int | float | str) else text


def _value(value: Any) -> struct_pb2.Value:
    if value is None:
        return struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, int | float):
        return struct_pb2.Value(number_value=float(value))
    return struct_pb2.Value(string_value=str(value))


def _pairs(values: Sequence[str], option: str) -> list[tuple[str, Any]]:
    pairs = []
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not key=value", param_hint=option)
        pairs.append((key.strip(), _scalar(value)))
    return pairs


# --- the group ------------------------------------------------------------------------------


@click.group()
@click.option(
    "--endpoint",
    "--address",
    "endpoint",
    envvar="LLMO_RETRIEVAL_ENDPOINT",
    default=None,
    help="Retrieval service host:port (env LLMO_RETRIEVAL_ENDPOINT) "
    f"[default: the running `llmo up` stack's, else 127.0.0.1:{DEFAULT_GRPC_PORTS['retrieval']}].",
)
@click.option("--api-key", envvar="LLMO_API_KEY", default=None, help="API key (Bearer) when the service requires one.")
@click.pass_context
def cli(ctx: click.Context, endpoint: str | None, api_key: str | None) -> None:
    """Collections, ingestion, search and evaluation on the retrieval service."""
    ctx.obj = {"endpoint": endpoint or default_endpoint(), "api_key": api_key}


_json_opt = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
_collection_opt = click.option("--collection", required=True, help="Collection id (or `collections/<id>`).")


# --- collections ----------------------------------------------------------------------------


def _collection_record(c: pb.Collection) -> dict[str, Any]:
    return {
        "name": c.name,
        "display_name": c.display_name,
        "documents": c.document_count,
        "chunks": c.chunk_count,
        "chunking": {
            "strategy": pb.ChunkingStrategy.Name(c.chunking.strategy).removeprefix("CHUNKING_STRATEGY_").lower(),
            "chunk_size_tokens": c.chunking.chunk_size_tokens,
            "chunk_overlap_tokens": c.chunking.chunk_overlap_tokens,
        },
        "knowledge_graph": c.knowledge_graph_enabled,
        "embedding_model": c.embedding_model,
        "create_time": c.create_time.ToDatetime().isoformat() + "Z" if c.HasField("create_time") else "",
    }


@cli.group()
def collections() -> None:
    """Create, list and delete collections."""


@collections.command("create")
@click.argument("name")
@click.option("--chunking", type=click.Choice(sorted(CHUNKING)), default=None,
              help="Chunking strategy [default: the service's, recursive].")
@click.option("--chunk-size", type=int, default=0, help="Chunk size in tokens [default: the service's, 256].")
@click.option("--chunk-overlap", type=int, default=0, help="Tokens shared by consecutive chunks [default: the service's, 32].")
@click.option("--knowledge-graph", is_flag=True, help="Extract entities at ingestion so `--mode graph` search works.")
@click.option("--display-name", default="", help="Human-readable name.")
@click.option("--description", default="")
@_json_opt
@click.pass_obj
def collections_create(obj: dict[str, Any], name: str, chunking: str | None, chunk_size: int, chunk_overlap: int,
                       knowledge_graph: bool, display_name: str, description: str, as_json: bool) -> None:
    """Create the collection NAME (ids match [a-z0-9][a-z0-9-]{0,62})."""
    request = pb.CreateCollectionRequest(
        collection_id=_short(name),
        collection=pb.Collection(
            display_name=display_name,
            description=description,
            knowledge_graph_enabled=knowledge_graph,
            chunking=pb.ChunkingConfig(chunk_size_tokens=chunk_size, chunk_overlap_tokens=chunk_overlap,
                                       strategy=CHUNKING[chunking] if chunking else pb.CHUNKING_STRATEGY_UNSPECIFIED),
        ),
        request_id=str(uuid.uuid4()),
    )

    async def create(stub: pb_grpc.RetrievalServiceStub, metadata: list[tuple[str, str]]) -> pb.Collection:
        return (await stub.CreateCollection(request, metadata=metadata, timeout=CALL_TIMEOUT_S)).collection

    record = _collection_record(_call(obj, create))
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    c = record["chunking"]
    out.print(f"created {record['name']}: chunking {c['strategy']} {c['chunk_size_tokens']}/{c['chunk_overlap_tokens']} "
              f"tokens, knowledge graph {'on' if record['knowledge_graph'] else 'off'}")


@collections.command("list")
@_json_opt
@click.pass_obj
def collections_list(obj: dict[str, Any], as_json: bool) -> None:
    """List the collections of the API key's tenant."""

    async def fetch(stub: pb_grpc.RetrievalServiceStub, metadata: list[tuple[str, str]]) -> list[pb.Collection]:
        found: list[pb.Collection] = []
        request = pb.ListCollectionsRequest(page_size=1000)
        while True:
            reply = await stub.ListCollections(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
            found.extend(reply.collections)
            if not reply.next_page_token:
                return found
            request.page_token = reply.next_page_token

    records = [_collection_record(c) for c in _call(obj, fetch)]
    if as_json:
        click.echo(json.dumps({"collections": records}, indent=2))
        return
    table = Table(title="collections")
    for column, justify in (("collection", "left"), ("documents", "right"), ("chunks", "right"), ("chunking", "left"),
                            ("graph", "left"), ("created (UTC)", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for r in records:
        c = r["chunking"]
        table.add_row(_short(r["name"]), f"{r['documents']:,}", f"{r['chunks']:,}",
                      f"{c['strategy']} {c['chunk_size_tokens']}/{c['chunk_overlap_tokens']}",
                      "on" if r["knowledge_graph"] else "off", r["create_time"][:19].replace("T", " "))
    out.print(table)


@collections.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Delete even when the collection holds documents.")
@click.pass_obj
def collections_delete(obj: dict[str, Any], name: str, force: bool) -> None:
    """Delete the collection NAME and its index."""
    request = pb.DeleteCollectionRequest(name=_collection_name(name), force=force)

    async def delete(stub: pb_grpc.RetrievalServiceStub, metadata: list[tuple[str, str]]) -> None:
        await stub.DeleteCollection(request, metadata=metadata, timeout=CALL_TIMEOUT_S)

    _call(obj, delete)
    out.print(f"deleted {request.name}")


# --- ingest ---------------------------------------------------------------------------------


def path_document_id(relative: str) -> str:
    """The document id of a file: its relative path slugged to `[a-z0-9-]`, cut to 54 characters,
    and 8 hex digits of the path's SHA-256, so two paths that slug alike stay apart. Stable: the same
    relative path always gives the same id, so re-ingesting a folder replaces (or skips) its documents."""
    slug = re.sub(r"[^a-z0-9]+", "-", relative.lower()).strip("-")[:54].rstrip("-")
    digest = hashlib.sha256(relative.encode("utf-8")).hexdigest()[:8]
    return f"{slug}-{digest}" if slug else f"doc-{digest}"


@dataclass
class Source:
    """One document to send: a file, or a record of a judged corpus."""

    source: str  # the relative path or the corpus id
    document_id: str
    path: Path | None = None
    mime_type: str = ""
    text: str = ""
    display_name: str = ""


@dataclass
class IngestOutcome:
    sent: list[Source] = field(default_factory=list)
    final: dict[int, pb.DocumentProgress] = field(default_factory=dict)
    unreadable: list[tuple[Source, str]] = field(default_factory=list)
    summary: pb.IngestSummary = field(default_factory=pb.IngestSummary)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def file_sources(paths: Sequence[Path]) -> list[Source]:
    """Files named on the command line (any extension: the service sniffs unknown ones) and, under
    directories, recursively every non-hidden file with a known extension; ids from the path
    relative to the directory given (a named file: its name)."""
    sources: dict[str, Source] = {}
    seen: set[Path] = set()
    for given in paths:
        if given.is_dir():
            found = [(f, f.relative_to(given).as_posix()) for f in sorted(given.rglob("*"))
                     if f.is_file() and f.suffix.lower() in MIME_BY_SUFFIX and not _hidden(f, given)]
        else:
            found = [(given, given.name)]
        for file, relative in found:
            if file.resolve() in seen:
                continue
            seen.add(file.resolve())
            did = path_document_id(relative)
            if did in sources:
                raise click.BadParameter(f"{sources[did].path} and {file} would be the same document {relative!r}; "
                                         "ingest them in separate runs or from different folders", param_hint="PATH")
            sources[did] = Source(relative, did, path=file, mime_type=MIME_BY_SUFFIX.get(file.suffix.lower(), ""),
                                  display_name=relative[:1024])
    return list(sources.values())


def dataset_corpus(folder: Path) -> tuple[list[Source], int]:
    """The corpus of a BEIR folder (corpus.jsonl) or a SMART folder (*.ALL), with the corpus ids
    mapped as the reranker harness maps them (`llmo.retrieval.rerank.harness.document_id`): the id
    itself when the service accepts it, else a stable digest. Title and text are joined as the
    harness joins them; records with neither are left out (their count is returned)."""
    from llmo.retrieval.rerank.data import load as load_dataset
    from llmo.retrieval.rerank.harness import document_id as dataset_document_id

    corpus: dict[str, tuple[str, str]]
    beir = folder / "corpus.jsonl"
    try:
        if beir.is_file():
            with beir.open(encoding="utf-8") as lines:
                records = [json.loads(line) for line in lines if line.strip()]
            corpus = {str(r["_id"]): (str(r.get("title") or ""), str(r.get("text") or "")) for r in records}
        else:
            corpus = load_dataset(folder).corpus
    except (OSError, ValueError, KeyError) as error:
        raise click.BadParameter(f"{folder}: {error}", param_hint="--beir") from error
    sources, empty = [], 0
    for raw, (title, text) in sorted(corpus.items()):
        body = f"{title}\n\n{text}" if title and text else (title or text)
        if not body.strip():
            empty += 1
            continue
        sources.append(Source(raw, dataset_document_id(raw), text=body, display_name=title[:1024]))
    return sources, empty


def _document_input(item: Source, metadata: list[tuple[str, Any]], acl: Sequence[str]) -> pb.DocumentInput:
    doc = pb.DocumentInput(document_id=item.document_id, display_name=item.display_name, mime_type=item.mime_type,
                           access_control=pb.AccessControl(allowed_principals=acl))
    if item.path is not None:
        doc.source_uri = item.path.resolve().as_uri()[:1024]
        doc.content = item.path.read_bytes()
    else:
        doc.text = item.text
    if metadata:
        doc.metadata.update(dict(metadata))
    return doc


async def stream_ingest(stub: pb_grpc.RetrievalServiceStub, meta: list[tuple[str, str]], name: str,
                        sources: Sequence[Source], outcome: IngestOutcome, progress: Progress, *,
                        pairs: Sequence[tuple[str, Any]] = (), acl: Sequence[str] = (), reindex: bool = False) -> None:
    """Stream `sources` into collection `name` through IngestDocuments, recording into `outcome`."""
    # Ask first: when the stream itself fails early (an unknown collection), grpc.aio may report a
    # write racing the server's status as INTERNAL "Internal error from Core" (grpc/grpc#36066).
    await stub.GetCollection(pb.GetCollectionRequest(name=name), metadata=meta, timeout=CALL_TIMEOUT_S)
    task = progress.add_task("ingesting", total=len(sources), extra="0 chunks")

    async def requests() -> AsyncIterator[pb.IngestDocumentsRequest]:
        yield pb.IngestDocumentsRequest(config=pb.IngestConfig(collection=name, reindex_unchanged=reindex))
        for item in sources:
            try:
                doc = await asyncio.to_thread(_document_input, item, list(pairs), acl)
            except OSError as error:
                outcome.unreadable.append((item, str(error)))
                progress.advance(task)
                continue
            outcome.sent.append(item)
            yield pb.IngestDocumentsRequest(document=doc)

    chunks = 0
    async for reply in stub.IngestDocuments(requests(), metadata=meta):
        if reply.HasField("summary"):
            outcome.summary = reply.summary
            continue
        update = reply.progress
        if update.stage in TERMINAL:
            outcome.final[update.index] = update
            chunks += update.chunks if update.stage == pb.INGEST_STAGE_INDEXED else 0
            progress.update(task, advance=1, extra=f"{chunks:,} chunks")


@cli.command()
@_collection_opt
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--beir", "beir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Ingest the corpus of this BEIR (corpus.jsonl) or SMART (*.ALL) folder, with its ids, "
              "instead of PATHs: what `evaluate --data` expects.")
@click.option("--acl", "acl", multiple=True, help="Principal allowed to read every document (repeatable); "
              "none: every principal of the tenant.")
@click.option("--metadata", "metadata", multiple=True, help="key=value on every document (repeatable); "
              "JSON numbers and true/false are typed, anything else is a string.")
@click.option("--reindex", is_flag=True, help="Re-index documents whose content is unchanged.")
@_json_opt
@click.pass_obj
def ingest(obj: dict[str, Any], collection: str, paths: tuple[Path, ...], beir: Path | None, acl: tuple[str, ...],
           metadata: tuple[str, ...], reindex: bool, as_json: bool) -> None:
    """Ingest files and folders (recursively) into a collection through IngestDocuments.

    \b
    Under a folder: *.txt, *.md, *.html / *.htm and *.pdf (hidden files skipped); a file named
    on the command line is sent whatever its extension (the service sniffs the type). The raw
    bytes go with the MIME type of the extension; the service extracts the text. The document
    id is derived from the path relative to the folder given (a named file: its name), so
    re-ingesting replaces changed files and reports unchanged ones.
    Exits 1 when any document failed.
    """
    if bool(paths) == (beir is not None):
        raise click.UsageError("give PATHs or --beir DIR (one of the two)")
    empty = 0
    if beir is not None:
        sources, empty = dataset_corpus(beir)
    else:
        sources = file_sources(paths)
    pairs = _pairs(metadata, "--metadata")
    name = _collection_name(collection)
    outcome = IngestOutcome()

    async def stream(stub: pb_grpc.RetrievalServiceStub, meta: list[tuple[str, str]]) -> None:
        with _progress(as_json) as progress:
            await stream_ingest(stub, meta, name, sources, outcome, progress, pairs=pairs, acl=acl, reindex=reindex)

    _call(obj, stream)
    failures = [{"source": item.source, "document": item.document_id, "reason": "READ_FAILED", "message": message}
                for item, message in outcome.unreadable]
    for index, update in sorted(outcome.final.items()):
        if update.stage == pb.INGEST_STAGE_FAILED:
            item = outcome.sent[index]
            failures.append({"source": item.source, "document": item.document_id, "reason": update.error_reason,
                             "message": update.error_message})
    summary = {
        "collection": name,
        "documents": len(sources),
        "indexed": outcome.summary.documents_indexed,
        "unchanged": outcome.summary.documents_skipped,
        "failed": len(failures),
        "chunks_indexed": outcome.summary.chunks_indexed,
        "empty_records_left_out": empty,
        "failures": failures,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        table = Table(title=f"ingested into {name}")
        table.add_column("documents")
        table.add_column("count", justify="right")
        for key in ("indexed", "unchanged", "failed"):
            table.add_row(key, f"{summary[key]:,}")
        table.add_row("chunks indexed", f"{summary['chunks_indexed']:,}")
        if empty:
            table.add_row("empty records left out", f"{empty:,}")
        out.print(table)
        if failures:
            failed = Table(title="failed documents")
            for column in ("source", "document", "reason", "message"):
                failed.add_column(column)
            for f in failures:
                failed.add_row(f["source"], f["document"], f["reason"], f["message"])
            out.print(failed)
    if failures:
        sys.exit(1)


# --- search ---------------------------------------------------------------------------------


def _snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def _mode_name(mode: int) -> str:
    return {int(v): k for k, v in MODES.items()}.get(mode, str(mode))


def _search_record(response: pb.SearchResponse) -> dict[str, Any]:
    return {
        "mode": _mode_name(response.mode),
        "candidates_considered": response.candidates_considered,
        "latency_ms": round(response.latency_ms, 3),
        "reranker_version": response.reranker_version,
        "results": [{
            "rank": r.rank,
            "score": r.score,
            "dense_score": r.dense_score,
            "sparse_score": r.sparse_score,
            "rerank_score": r.rerank_score,
            "document": _short(r.chunk.document),
            "display_name": r.chunk.document_display_name,
            "chunk": r.chunk.index,
            "heading_path": list(r.chunk.heading_path),
            "text": r.chunk.text,
            "metadata": json_format.MessageToDict(r.chunk.metadata),
            "matched_entities": list(r.matched_entities),
        } for r in response.results],
        "stages": [{"stage": s.stage, "latency_ms": round(s.latency_ms, 3), "items": s.items, "fell_back": s.fell_back,
                    "fallback_reason": s.fallback_reason} for s in response.stages],
    }


@cli.command()
@_collection_opt
@click.argument("query")
@click.option("--mode", type=click.Choice(list(MODES)), default="hybrid", show_default=True,
              help="graph needs a collection created with --knowledge-graph.")
@click.option("--top-k", type=click.IntRange(1, 100), default=10, show_default=True)
@click.option("--rerank", is_flag=True, help="Re-rank the candidates with the service's learned reranker.")
@click.option("--reorder", is_flag=True, help="Strongest results at both ends of the list (rank keeps relevance).")
@click.option("--filter", "filters", multiple=True,
              help="key=value: only documents whose metadata field equals the value (repeatable, all must hold).")
@click.option("--principal", default="", help="Search as this subject, e.g. user:alice (default: anonymous, "
              "which sees only documents without an access list).")
@click.option("--group", "groups", multiple=True, help="A group of the principal, e.g. group:eng (repeatable).")
@_json_opt
@click.pass_obj
def search(obj: dict[str, Any], collection: str, query: str, mode: str, top_k: int, rerank: bool, reorder: bool,
           filters: tuple[str, ...], principal: str, groups: tuple[str, ...], as_json: bool) -> None:
    """Search a collection: results (rank, score, document, heading path, snippet), then the
    latency of every stage the search ran."""
    request = pb.SearchRequest(collection=_collection_name(collection), query=query, top_k=top_k, mode=MODES[mode],
                               principal=pb.Principal(subject=principal, groups=groups))
    for key, value in _pairs(filters, "--filter"):
        request.filters.add(key=key, operator=pb.FILTER_OPERATOR_EQUAL, values=[_value(value)])
    request.rerank.enabled = rerank
    request.reorder.enabled = reorder

    async def run(stub: pb_grpc.RetrievalServiceStub, metadata: list[tuple[str, str]]) -> pb.SearchResponse:
        return await stub.Search(request, metadata=metadata, timeout=CALL_TIMEOUT_S)

    record = _search_record(_call(obj, run))
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    table = Table(title=f"{query!r} in {request.collection} ({record['mode']})")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("document", overflow="fold")
    table.add_column("heading path")
    table.add_column("snippet")
    for r in record["results"]:
        table.add_row(str(r["rank"]), f"{r['score']:.4f}", r["document"], " > ".join(r["heading_path"]), _snippet(r["text"]))
    out.print(table)
    out.print(_stage_table(record))


def _stage_table(record: dict[str, Any]) -> Table:
    extra = f", reranker {record['reranker_version']}" if record["reranker_version"] else ""
    table = Table(title=f"stages: {record['latency_ms']:.1f} ms in all, "
                        f"{record['candidates_considered']:,} candidates considered{extra}")
    table.add_column("stage")
    table.add_column("latency ms", justify="right")
    table.add_column("items", justify="right")
    table.add_column("fallback")
    for s in record["stages"]:
        table.add_row(s["stage"], f"{s['latency_ms']:.2f}", str(s["items"]), s["fallback_reason"] if s["fell_back"] else "")
    return table


# --- evaluate -------------------------------------------------------------------------------


def ranking_of(response: pb.SearchResponse, to_dataset: dict[str, str]) -> list[str]:
    """The data set's document ids of a response, distinct, best first; chunks of documents that
    are not in the data set are left out."""
    found: list[str] = []
    for result in sorted(response.results, key=lambda r: r.rank):
        doc = to_dataset.get(_short(result.chunk.document))
        if doc is not None and doc not in found:
            found.append(doc)
    return found


EVAL_MODES: dict[str, tuple[int, bool, int]] = {  # name -> (search mode, rerank, fusion method)
    "sparse": (pb.SEARCH_MODE_SPARSE, False, 0),
    "dense": (pb.SEARCH_MODE_DENSE, False, 0),
    "hybrid": (pb.SEARCH_MODE_HYBRID, False, pb.FUSION_METHOD_RRF),
    "convex": (pb.SEARCH_MODE_HYBRID, False, pb.FUSION_METHOD_CONVEX),
    "rerank": (pb.SEARCH_MODE_HYBRID, True, pb.FUSION_METHOD_RRF),
    "graph": (pb.SEARCH_MODE_KNOWLEDGE_GRAPH, False, 0),
}


def _modes(value: str) -> list[str]:
    modes = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in modes if m not in EVAL_MODES]
    if not modes or unknown:
        raise click.BadParameter(f"{', '.join(unknown) or value!r}: choose from {', '.join(EVAL_MODES)}",
                                 param_hint="--modes")
    return list(dict.fromkeys(modes))


def _trained_on(dataset: str, split: str) -> str:
    """The builtin reranker's version when it was trained on this data set's split, else ''."""
    from llmo.retrieval.rerank import BUILTIN_DIR

    try:
        meta = json.loads((BUILTIN_DIR / "reranker.json").read_text())
    except (OSError, ValueError):
        return ""
    training = meta.get("training", {})
    names = {c.get("name") for c in training.get("collections", [])}
    return str(meta.get("version", "")) if dataset in names and training.get("split") == split else ""


@cli.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) or SMART folder (*.ALL, *.QRY, *.REL).")
@click.option("--split", default="test", show_default=True, help="BEIR qrels split (SMART folders have one).")
@click.option("--modes", "modes_text", default="sparse,dense,hybrid,rerank", show_default=True,
              help="Comma-separated: sparse, dense, hybrid (RRF), convex (hybrid, convex fusion), rerank "
                   "(hybrid + the service's reranker), graph (a --collection with the knowledge graph).")
@click.option("--collection", default=None,
              help="Evaluate an existing collection holding the corpus (ingested with `ingest --beir`); default: "
                   "ingest the corpus into a temporary collection, deleted afterwards.")
@click.option("--k", "k", type=click.IntRange(1, 100), default=10, show_default=True, help="Cut-off of nDCG and MRR.")
@click.option("--depth", type=click.IntRange(1, 100), default=100, show_default=True,
              help="Results asked per query: the cut-off of recall and the ranking MAP is computed over; >= --k.")
@click.option("--resamples", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="Bootstrap resamples of the queries for the 95% intervals.")
@_json_opt
@click.pass_obj
def evaluate(obj: dict[str, Any], data_dir: Path, split: str, modes_text: str, collection: str | None, k: int,
             depth: int, resamples: int, as_json: bool) -> None:
    """Run every judged query of a data set as a Search in each mode and report nDCG@k, recall@depth,
    MRR@k and MAP (means with bootstrap 95% intervals over queries) and the server's latency p50 / p99.

    Without --collection the corpus is ingested through the service into a temporary collection
    (chunks/s reported), evaluated, and deleted. A learned part is never scored on the data it was
    trained on: `rerank` on the split the service's builtin reranker was trained on is left out
    with a note (`llmo bench retrieval` reports the cross-validated number).
    """
    from llmo.retrieval import evaluation
    from llmo.retrieval.rerank.data import load as load_dataset
    from llmo.retrieval.rerank.harness import document_id as dataset_document_id

    modes = _modes(modes_text)
    if depth < k:
        raise click.BadParameter(f"--depth {depth} is below --k {k}", param_hint="--depth")
    try:
        dataset = load_dataset(data_dir, split)
    except (OSError, ValueError, KeyError) as error:
        raise click.BadParameter(str(error), param_hint="--data") from error
    if not dataset.queries:
        raise click.BadParameter(f"{data_dir}: no judged queries for split {split!r}", param_hint="--data")
    to_dataset = {dataset_document_id(d): d for d in dataset.corpus}
    temporary = collection is None
    name = _collection_name(collection or f"eval-{uuid.uuid4().hex[:12]}")
    notes: list[str] = []
    per_mode: dict[str, dict[str, Any]] = {}
    ingest: dict[str, Any] = {}

    async def run(stub: pb_grpc.RetrievalServiceStub, metadata: list[tuple[str, str]]) -> None:
        if temporary:
            await stub.CreateCollection(pb.CreateCollectionRequest(
                collection_id=_short(name), collection=pb.Collection(display_name=f"evaluate {dataset.name}")),
                metadata=metadata, timeout=CALL_TIMEOUT_S)
        try:
            with _progress(as_json) as progress:
                if temporary:
                    sources, _ = dataset_corpus(data_dir)
                    outcome = IngestOutcome()
                    started = time.perf_counter()
                    await stream_ingest(stub, metadata, name, sources, outcome, progress)
                    seconds = time.perf_counter() - started
                    ingest.update(documents=outcome.summary.documents_indexed, chunks=outcome.summary.chunks_indexed,
                                  seconds=round(seconds, 3),
                                  chunks_per_s=round(outcome.summary.chunks_indexed / seconds, 1) if seconds else 0.0)
                for mode in modes:
                    search_mode, rerank, fusion = EVAL_MODES[mode]
                    trained = _trained_on(dataset.name, split) if rerank else ""
                    per_query: list[dict[str, float]] = []
                    server_ms: list[float] = []
                    task = progress.add_task(mode, total=len(dataset.queries), extra="")
                    for qid, text in dataset.queries.items():
                        request = pb.SearchRequest(collection=name, query=text[:MAX_QUERY_CHARS], top_k=depth,
                                                   mode=search_mode)  # type: ignore[arg-type]
                        request.rerank.enabled = rerank
                        request.fusion.method = fusion  # type: ignore[assignment]
                        response = await stub.Search(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
                        if trained and response.reranker_version == trained:
                            notes.append(f"rerank left out: the service's reranker {trained} was trained on "
                                         f"{dataset.name} ({split}); `llmo bench retrieval` cross-validates it")
                            break
                        server_ms.append(response.latency_ms)
                        per_query.append(evaluation.query_metrics(ranking_of(response, to_dataset),
                                                                  dataset.qrels[qid], k, depth))
                        progress.update(task, advance=1, extra=f"nDCG@{k} "
                                        f"{sum(q[f'ndcg@{k}'] for q in per_query) / len(per_query):.3f}")
                    if per_query:
                        estimates = evaluation.summarise(per_query, resamples=resamples)
                        per_mode[mode] = {
                            "queries": len(per_query),
                            "metrics": {m: e.as_dict() for m, e in estimates.items()},
                            "latency_ms": {"p50": round(evaluation.percentile(server_ms, 50), 3),
                                           "p99": round(evaluation.percentile(server_ms, 99), 3)},
                        }
        finally:
            if temporary:
                await stub.DeleteCollection(pb.DeleteCollectionRequest(name=name, force=True), metadata=metadata,
                                            timeout=CALL_TIMEOUT_S)

    _call(obj, run)
    report: dict[str, Any] = {"data": str(data_dir), "dataset": dataset.name, "split": split,
                              "collection": name, "temporary": temporary, "k": k, "depth": depth,
                              "queries": len(dataset.queries), "ingest": ingest, "modes": per_mode, "notes": notes}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    metric_names = [f"ndcg@{k}", f"recall@{depth}", f"mrr@{k}", "map"]
    table = Table(title=f"{dataset.name} ({split}, {len(dataset.queries)} queries)"
                        + (f", ingested {ingest['chunks']:,} chunks at {ingest['chunks_per_s']:,} chunks/s"
                           if ingest else f" on {name}"))
    table.add_column("mode")
    for metric in metric_names:
        table.add_column(metric, justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("p99 ms", justify="right")
    for mode, result in per_mode.items():
        cells = [f"{result['metrics'][m]['mean']:.4f} [{result['metrics'][m]['ci95_low']:.3f}, "
                 f"{result['metrics'][m]['ci95_high']:.3f}]" for m in metric_names]
        table.add_row(mode, *cells, f"{result['latency_ms']['p50']:.1f}", f"{result['latency_ms']['p99']:.1f}")
    out.print(table)
    for note in notes:
        err.print(f"[yellow]{note}[/]")


if __name__ == "__main__":
    cli()
