"""The `make demo` step of the retrieval service against the real service over gRPC (SQLite, the real
MiniLM model): it ingests, searches in every mode with access control, checks tenant isolation and
cleans up, with API keys on and off."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from rich.console import Console
from rich.table import Table

from llmo.core.natsd import NatsServer
from llmo.core.settings import PlatformSettings
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.protos.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc
from llmo.retrieval import demo
from llmo.retrieval.main import RunningRetrieval, start
from llmo.retrieval.settings import RetrievalSettings

TENANTS = {"tenantA": "ka", "tenantB": "kb"}


async def _start(tmp_path: Path, nats: NatsServer, api_keys: dict[str, str]) -> RunningRetrieval:
    settings = RetrievalSettings(database_url=f"sqlite:///{tmp_path / 'retrieval.db'}", metrics_port=-1,
                                 platform=PlatformSettings(nats_url=nats.url, data_dir=tmp_path,
                                                           drain_seconds=0.5, api_keys=api_keys))
    return await start(settings, port=0, metrics=False)


@pytest.fixture
async def keyed(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[RunningRetrieval]:
    running = await _start(tmp_path, nats_server, {key: tenant for tenant, key in TENANTS.items()})
    try:
        yield running
    finally:
        await running.stop()


def _text(lines: list[object]) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    for line in lines:
        console.print(line)
    return console.export_text()


async def test_demo_ingests_searches_isolates_and_cleans_up(keyed: RunningRetrieval) -> None:
    target = f"127.0.0.1:{keyed.port}"
    lines = await demo.run_demo({"retrieval": target}, tenants=TENANTS, admin_key="")
    text = _text(lines)
    strings = [line for line in lines if isinstance(line, str)]
    assert strings[0].startswith("retrieval: created collections/demo-") and "as tenantA" in strings[0]
    for doc, mime in (("handbook", "text/markdown"), ("status-page", "text/html"), ("faq", "text/plain"),
                      ("q3-budget", "text/markdown, readable by group:finance")):
        assert any(s.startswith(f"retrieval: ingested {doc} ({mime}): INDEXED, ") for s in strings), text
    assert "retrieval: ingest summary: 4 received, 4 indexed, 0 skipped, 0 failed" in text
    tables = [line for line in lines if isinstance(line, Table)]
    assert len(tables) == 4 and "user:alice" in str(tables[0].title) and "user:bob" in str(tables[1].title)
    member_docs, outsider_docs = (list(t.columns[0].cells) for t in tables[:2])
    assert "q3-budget" in member_docs and "q3-budget" not in outsider_docs and outsider_docs
    # the Markdown heading path reaches the table
    assert "Q3 budget forecast › Travel" in text
    assert any(s.startswith("retrieval: sparse top 3 as user:alice:") for s in strings)
    assert any(s.startswith("retrieval: dense top 3 as user:alice:") for s in strings)
    assert any(s.startswith("retrieval: tenantB on collections/demo-") and
               "GetCollection NOT_FOUND COLLECTION_NOT_FOUND, Search NOT_FOUND COLLECTION_NOT_FOUND" in s
               for s in strings), text
    # the whole pipeline, without the generator stages (no router in this stack)
    assert any(s.startswith("retrieval: full pipeline (rerank, reorder, compression") for s in strings), text
    stage_rows = list(tables[3].columns[0].cells)
    assert {"rerank", "reorder", "compression"} <= set(stage_rows) and "hyde" not in stage_rows
    assert "reranker lambdarank-" in str(tables[3].title)
    assert any(s.startswith("retrieval: the same pipeline as user:bob:") and "nothing from q3-budget" in s
               for s in strings), text
    assert strings[-1].startswith("retrieval: deleted collections/demo-")
    async with grpc.aio.insecure_channel(target) as channel:
        listed = await pb_grpc.RetrievalServiceStub(channel).ListCollections(
            pb.ListCollectionsRequest(), metadata=[("authorization", "Bearer ka")])
    assert not listed.collections


async def test_demo_runs_with_api_keys_off(tmp_path: Path, nats_server: NatsServer) -> None:
    running = await _start(tmp_path, nats_server, {})
    try:
        lines = await demo.run_demo({"retrieval": f"127.0.0.1:{running.port}"}, tenants={}, admin_key="")
    finally:
        await running.stop()
    strings = [line for line in lines if isinstance(line, str)]
    assert " as " not in strings[0] and strings[-1].startswith("retrieval: deleted ")
    assert not any("NOT_FOUND" in s for s in strings)


def test_acl_check_fails_the_demo_when_the_restricted_document_leaks_or_is_missing() -> None:
    def reply(*docs: str) -> pb.SearchResponse:
        return pb.SearchResponse(results=[pb.SearchResult(chunk=pb.Chunk(document=f"collections/c/documents/{d}"))
                                          for d in docs])

    demo._check_acl("hybrid", reply("q3-budget", "faq"), reply("faq"))
    with pytest.raises(RuntimeError, match="returned q3-budget"):
        demo._check_acl("hybrid", reply("q3-budget"), reply("q3-budget"))
    with pytest.raises(RuntimeError, match="did not find q3-budget"):
        demo._check_acl("dense", reply("faq"), reply("faq"))
