"""`llmo retrieval ...` (llmo.retrieval.cli) against the real retrieval service started in-process on
a socket (SQLite, the real MiniLM model): collections, ingestion of a folder, search (table and
JSON, filters, access control, rerank), evaluation on a hand-written BEIR folder with an nDCG
computed by hand, and the error paths."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmo.core.settings import PlatformSettings
from llmo.retrieval.cli import path_document_id
from llmo.retrieval.main import RunningRetrieval, start
from llmo.retrieval.rerank.harness import document_id
from llmo.retrieval.settings import RetrievalSettings

API_KEY, TENANT = "cli-key", "tenant-cli"

GUIDE_MD = """# Operations guide

## Backups

Nightly backups of the ledger database run at two in the morning and are kept for thirty days.

## Deployments

Deployments roll out one region at a time behind a canary.
"""
NOTES_TXT = "Meeting notes: the cafeteria menu changes on Mondays and the coffee machine was repaired."
PAGE_HTML = """<html><head><title>Status</title></head><body><nav>Home | Login</nav>
<article><h1>Status page</h1><p>All regions are operational and search latency is within its objective.</p>
</article><footer>footer text</footer></body></html>"""
DEEP_MD = "# Runbook\n\nRotate the TLS certificates of the gateway every ninety days.\n"
SECRET_TXT = "The acquisition budget for the observatory project is confidential."


class Service:
    """The retrieval service on its own event loop in a thread, so the CLI (which runs its own
    asyncio loop per command) can be driven from synchronous tests."""

    def __init__(self, data: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        settings = RetrievalSettings(
            database_url=f"sqlite:///{data / 'retrieval.db'}", metrics_port=-1, publish_events=False,
            min_candidates=10, platform=PlatformSettings(data_dir=data, api_keys={API_KEY: TENANT},
                                                         nats_url="nats://127.0.0.1:1", drain_seconds=0.5))
        self.running: RunningRetrieval = self._run(start(settings, port=0, metrics=False))
        self.address = f"127.0.0.1:{self.running.port}"

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=120)

    def close(self) -> None:
        self._run(self.running.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    running = Service(tmp_path_factory.mktemp("retrieval-cli"))
    try:
        yield running
    finally:
        running.close()


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def _invoke(service: Service, *args: str, key: str | None = API_KEY) -> Result:
    """`llmo retrieval ...` as a user runs it: its own process, through the `llmo` command's mount
    (the service's logs stay in this process, out of the command's stdout)."""
    prefix = ["--address", service.address] + (["--api-key", key] if key else [])
    env = {k: v for k, v in os.environ.items() if k not in ("LLMO_API_KEY", "LLMO_RETRIEVAL_ENDPOINT")}
    done = subprocess.run([sys.executable, "-m", "llmo.cli.main", "retrieval", *prefix, *args], capture_output=True,
                          text=True, env={**env, "COLUMNS": "240", "LLMO_LOG_LEVEL": "warning"}, timeout=300)
    return Result(done.returncode, done.stdout, done.stderr)


def _json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _folder(root: Path) -> Path:
    docs = root / "docs"
    (docs / "ops").mkdir(parents=True)
    (docs / ".hidden").mkdir()
    (docs / "guide.md").write_text(GUIDE_MD)
    (docs / "notes.txt").write_text(NOTES_TXT)
    (docs / "status.html").write_text(PAGE_HTML)
    (docs / "ops" / "Run Book.md").write_text(DEEP_MD)
    (docs / ".hidden" / "skipped.md").write_text("never sent")
    (docs / "image.bin").write_bytes(b"\x00\x01 not a document")
    return docs


def test_path_document_ids_are_valid_stable_and_distinct() -> None:
    ids = [path_document_id(p) for p in ("guide.md", "ops/Run Book.md", "ops/run-book.md", "Ünïcode.md", "x" * 200)]
    assert len(set(ids)) == len(ids)
    assert ids[1].startswith("ops-run-book-md-") and ids[1] == path_document_id("ops/Run Book.md")
    for did in ids:
        assert len(did) <= 63 and did[0].isalnum() and did == did.lower()
        assert all(c.isdigit() or "a" <= c <= "z" or c == "-" for c in did)


def test_ingest_a_folder_then_search_it(service: Service, tmp_path: Path) -> None:
    docs = _folder(tmp_path)
    created = _json(_invoke(service, "collections", "create", "handbook", "--chunking", "heading", "--json"))
    assert created["name"] == "collections/handbook" and created["chunking"]["strategy"] == "heading"

    summary = _json(_invoke(service, "ingest", "--collection", "handbook", "--metadata", "team=ops",
                            "--metadata", "year=2024", str(docs), "--json"))
    assert (summary["documents"], summary["indexed"], summary["unchanged"], summary["failed"]) == (4, 4, 0, 0)
    assert summary["chunks_indexed"] >= 4 and summary["failures"] == []

    again = _invoke(service, "ingest", "--collection", "handbook", "--metadata", "team=ops", "--metadata",
                    "year=2024", str(docs))
    assert again.exit_code == 0, again.output
    assert re.search(r"indexed\s*│\s*0\s*│", again.stdout) and re.search(r"unchanged\s*│\s*4\s*│", again.stdout)

    listed = _json(_invoke(service, "collections", "list", "--json"))
    assert [(c["name"], c["documents"]) for c in listed["collections"]] == [("collections/handbook", 4)]

    guide = path_document_id("guide.md")
    found = _json(_invoke(service, "search", "--collection", "handbook", "how long are nightly backups kept",
                          "--mode", "sparse", "--top-k", "3", "--json"))
    assert found["mode"] == "sparse"
    top = found["results"][0]
    assert (top["document"], top["rank"], top["heading_path"]) == (guide, 1, ["Operations guide", "Backups"])
    assert top["display_name"] == "guide.md" and top["metadata"] == {"team": "ops", "year": 2024}
    assert [s["stage"] for s in found["stages"]][:2] == ["index", "sparse"]

    table = _invoke(service, "search", "--collection", "handbook", "rotate the gateway TLS certificates")
    assert table.exit_code == 0, table.output
    assert path_document_id("ops/Run Book.md") in table.stdout and "Runbook" in table.stdout
    for stage in ("index", "embed", "dense", "sparse", "fusion", "fetch"):
        assert f" {stage} " in table.stdout

    # metadata filters (typed values) and reordering
    assert _json(_invoke(service, "search", "--collection", "handbook", "backups", "--filter", "team=sales",
                         "--json"))["results"] == []
    filtered = _json(_invoke(service, "search", "--collection", "handbook", "backups", "--filter", "year=2024",
                             "--reorder", "--json"))
    ranks = [r["rank"] for r in filtered["results"]]
    assert len(ranks) > 2 and sorted(ranks) == list(range(1, len(ranks) + 1)) and ranks[-1] == 2  # 1, 3, ..., 2
    assert "reorder" in {s["stage"] for s in filtered["stages"]}
    reranked = _json(_invoke(service, "search", "--collection", "handbook", "backups", "--rerank", "--json"))
    assert "rerank" in {s["stage"] for s in reranked["stages"]} and reranked["results"]
    assert all(r["rerank_score"] == r["score"] for r in reranked["results"])

    # access control: a document for group:finance only
    (tmp_path / "secret.txt").write_text(SECRET_TXT)
    assert _json(_invoke(service, "ingest", "--collection", "handbook", "--acl", "group:finance",
                         str(tmp_path / "secret.txt"), "--json"))["indexed"] == 1
    secret = path_document_id("secret.txt")
    query = ["search", "--collection", "handbook", "observatory acquisition budget", "--mode", "sparse", "--json"]
    assert secret not in [r["document"] for r in _json(_invoke(service, *query))["results"]]
    assert secret not in [r["document"] for r in _json(_invoke(service, *query, "--principal", "user:bob"))["results"]]
    member = _json(_invoke(service, *query, "--principal", "user:ann", "--group", "group:finance"))
    assert member["results"][0]["document"] == secret

    deleted = _invoke(service, "collections", "delete", "handbook", "--force")
    assert deleted.exit_code == 0 and "deleted collections/handbook" in deleted.stdout


def test_a_failed_document_is_reported_and_exits_1(service: Service, tmp_path: Path) -> None:
    assert _invoke(service, "collections", "create", "failing").exit_code == 0
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "ok.md").write_text("# Fine\n\nA perfectly good document about sailing boats.\n")
    result = _invoke(service, "ingest", "--collection", "failing", str(tmp_path / "empty.txt"), str(tmp_path / "ok.md"),
                     "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert (summary["indexed"], summary["failed"]) == (1, 1)
    assert summary["failures"] == [{"source": "empty.txt", "document": path_document_id("empty.txt"),
                                    "reason": "EMPTY_CONTENT", "message": "the document has no content"}]
    table = _invoke(service, "ingest", "--collection", "failing", str(tmp_path / "empty.txt"))
    assert table.exit_code == 1 and "EMPTY_CONTENT" in table.stdout and "failed documents" in table.stdout


def _beir(root: Path) -> Path:
    """Three documents, two queries. `lava` matches only Doc_A (relevant): nDCG 1. `glacier` matches
    b three times in a short text and c once in a long one; c is the relevant one and ranks second
    under BM25: nDCG = (1 / log2 3) / 1."""
    folder = root / "tiny-beir"
    (folder / "qrels").mkdir(parents=True)
    corpus = [
        {"_id": "Doc_A", "title": "Volcanoes", "text": "Volcanoes erupt molten lava from deep under the mountain."},
        {"_id": "b", "title": "", "text": "Glacier glacier glacier ice."},
        {"_id": "c", "title": "Landscapes", "text": "A long survey of oceans, forests, deserts, rivers, plains, "
                                                    "wetlands, one glacier and many other landscapes of the world."},
        {"_id": "empty", "title": "", "text": ""},
    ]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    queries = [{"_id": "q1", "text": "lava"}, {"_id": "q2", "text": "glacier"}, {"_id": "q3", "text": "unjudged"}]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tDoc_A\t1\nq2\tc\t1\nq2\tb\t0\n")
    return folder


def test_evaluate_a_beir_folder(service: Service, tmp_path: Path) -> None:
    folder = _beir(tmp_path)
    assert _invoke(service, "collections", "create", "tiny").exit_code == 0
    summary = _json(_invoke(service, "ingest", "--collection", "tiny", "--beir", str(folder), "--json"))
    assert (summary["documents"], summary["indexed"], summary["empty_records_left_out"]) == (3, 3, 1)
    # the refused id is mapped the way the reranker harness maps it
    hits = _json(_invoke(service, "search", "--collection", "tiny", "lava", "--mode", "sparse", "--json"))["results"]
    assert hits[0]["document"] == document_id("Doc_A") != "Doc_A"

    report = _json(_invoke(service, "evaluate", "--collection", "tiny", "--data", str(folder), "--modes", "sparse",
                           "--k", "10", "--resamples", "200", "--json"))
    assert (report["queries"], report["k"], report["split"], report["temporary"]) == (2, 10, "test", False)
    metrics = report["modes"]["sparse"]["metrics"]
    expected = (1.0 + 1 / math.log2(3)) / 2
    assert metrics["ndcg@10"]["mean"] == pytest.approx(expected, abs=1e-6)
    assert metrics["ndcg@10"]["ci95_low"] == pytest.approx(1 / math.log2(3), abs=1e-6)
    assert metrics["ndcg@10"]["ci95_high"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["recall@100"]["mean"] == 1.0
    assert metrics["mrr@10"]["mean"] == pytest.approx(0.75) and metrics["map"]["mean"] == pytest.approx(0.75)
    latency = report["modes"]["sparse"]["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"]

    # without --collection: a temporary collection, ingested, evaluated in every mode asked, deleted
    temporary = _json(_invoke(service, "evaluate", "--data", str(folder), "--modes", "sparse,hybrid,convex,rerank",
                              "--resamples", "50", "--json"))
    assert temporary["temporary"] and temporary["ingest"]["documents"] == 3 and temporary["ingest"]["chunks_per_s"] > 0
    assert set(temporary["modes"]) == {"sparse", "hybrid", "convex", "rerank"} and temporary["notes"] == []
    assert temporary["modes"]["sparse"]["metrics"]["ndcg@10"]["mean"] == pytest.approx(expected, abs=1e-6)
    listed = _json(_invoke(service, "collections", "list", "--json"))
    assert all(not c["name"].startswith("collections/eval-") for c in listed["collections"])

    table = _invoke(service, "evaluate", "--collection", "tiny", "--data", str(folder), "--modes", "sparse")
    assert table.exit_code == 0, table.output
    assert f"{expected:.4f}" in table.stdout and "ndcg@10" in table.stdout and "p99" in table.stdout

    missing = _invoke(service, "evaluate", "--collection", "tiny", "--data", str(folder), "--split", "dev")
    assert missing.exit_code == 2 and "no judgements for split 'dev'" in missing.output
    unknown = _invoke(service, "evaluate", "--data", str(folder), "--modes", "sparse,fancy")
    assert unknown.exit_code == 2 and "fancy" in unknown.output


def test_the_builtin_reranker_is_never_scored_on_its_training_split(tmp_path: Path) -> None:
    from llmo.retrieval.cli import _trained_on
    from llmo.retrieval.rerank import BUILTIN_DIR

    meta = json.loads((BUILTIN_DIR / "reranker.json").read_text())
    trained = meta["training"]["collections"][0]["name"]
    assert _trained_on(trained, meta["training"]["split"]) == meta["version"]
    assert _trained_on(trained, "test") == "" and _trained_on("cisi", meta["training"]["split"]) == ""


def test_knowledge_graph_collection(service: Service, tmp_path: Path) -> None:
    created = _json(_invoke(service, "collections", "create", "graph", "--knowledge-graph", "--json"))
    assert created["knowledge_graph"] is True
    (tmp_path / "org.txt").write_text("Alice Smith works at Acme Corporation in Berlin. Acme Corporation acquired Globex.")
    assert _invoke(service, "ingest", "--collection", "graph", str(tmp_path / "org.txt")).exit_code == 0
    found = _json(_invoke(service, "search", "--collection", "graph", "Who works at Acme Corporation?", "--mode",
                          "graph", "--json"))
    assert found["mode"] == "graph" and found["results"][0]["document"] == path_document_id("org.txt")
    assert found["results"][0]["matched_entities"] and found["stages"][0]["stage"] == "knowledge_graph"
    # a plain collection refuses graph mode with the service's reason
    assert _invoke(service, "collections", "create", "plain").exit_code == 0
    refused = _invoke(service, "search", "--collection", "plain", "Acme", "--mode", "graph")
    assert refused.exit_code == 1 and "FAILED_PRECONDITION [KNOWLEDGE_GRAPH_DISABLED]" in refused.stderr


def test_errors_are_one_line_messages(service: Service, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("some text")
    for args in (["search", "--collection", "nope", "anything"],
                 ["ingest", "--collection", "nope", str(tmp_path / "a.txt")],
                 ["evaluate", "--collection", "nope", "--data", str(_beir(tmp_path))],
                 ["collections", "delete", "nope"]):
        result = _invoke(service, *args)
        assert result.exit_code == 1, result.output
        assert f"Error: retrieval service at {service.address}: NOT_FOUND [COLLECTION_NOT_FOUND]" in result.output
        assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1
    unauthenticated = _invoke(service, "collections", "list", key=None)
    assert unauthenticated.exit_code == 1 and "UNAUTHENTICATED" in unauthenticated.output
    bad = _invoke(service, "collections", "create", "Bad_Id")
    assert bad.exit_code == 1 and "INVALID_ARGUMENT [INVALID_COLLECTION_ID]" in bad.output
    usage = _invoke(service, "ingest", "--collection", "x")
    assert usage.exit_code == 2 and "give PATHs or --beir DIR" in usage.output
