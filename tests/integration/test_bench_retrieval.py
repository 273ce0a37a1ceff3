"""`llmo bench retrieval --smoke` runs every area end to end on a generated tiny collection: the real
service in-process over gRPC (hybrid with RRF and convex fusion, the goal checks), the direct bm25s /
FAISS peers, the BM25 library subprocesses, the pgvector backend's bytes (pgserver) and the HNSW
scaling, and prints one JSON object (no data from ../shared). The LangChain peer is skipped under
--smoke; a run without --smoke on the tiny collection exercises it where its venv exists."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_retrieval.py"
LANGCHAIN_PYTHON = Path(__file__).resolve().parents[2] / ".peers" / "retrieval-langchain" / "bin" / "python"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_retrieval_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _score(entry: dict[str, object]) -> None:
    assert 0.0 <= float(entry["ndcg10"]) <= 1.0  # type: ignore[arg-type]
    assert 0.0 <= float(entry["recall100"]) <= 1.0  # type: ignore[arg-type]


def test_tiny_collections_are_loadable_and_judged(tmp_path: Path) -> None:
    bench = load_bench()
    from llmo.retrieval.rerank import data as judged

    root = bench.write_tiny_collections(tmp_path)
    beir, smart = judged.load(root / "retrieval" / "scifact", "train"), judged.load(root / "retrieval" / "cisi")
    assert len(beir.corpus) == len(smart.corpus) == 36
    assert len(beir.queries) == len(smart.queries) == 12
    assert all(beir.qrels[q] for q in beir.queries) and all(smart.qrels[q] for q in smart.queries)


def test_smoke_run_reports_every_area(tmp_path: Path) -> None:
    bench = load_bench()
    out = tmp_path / "result.json"
    result = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["anchors"]["scifact_test_ndcg10"]["bm25"]["value"] == 0.665

    for name in ("scifact", "cisi"):
        quality = result["quality"][name]
        for mode in ("sparse", "dense", "hybrid", "hybrid_convex", "hybrid_rerank_crossval"):
            _score(quality["service"][mode])
        for peer in ("bm25s_direct", "faiss_flat_direct", "rrf_of_direct"):
            _score(quality["peers"][peer])
        assert quality["service"]["hybrid_rerank_crossval"]["folds"] == 2
        _check_goals(quality["service"], quality["goals"])
        assert quality["peers"]["langchain_ensemble"] == {"skipped": "--smoke: the LangChain peer is not run"}
        assert quality["ratios"]["service_hybrid_over_langchain_ndcg10"] is None
        speed = result["speed"][name]
        for mode in ("sparse", "dense", "hybrid", "hybrid_convex", "hybrid_rerank"):
            assert speed["service"][mode]["n"] == 8 and speed["service"][mode]["p99_ms"] >= speed["service"][mode]["p50_ms"]
        assert speed["peers"]["bm25s_direct"]["n"] == 8
        assert "skipped" in speed["peers"]["langchain_ensemble"]
        assert speed["ratios"]["hybrid_p50_service_over_langchain"] is None
        assert result["collections"][name]["chunks"] >= 36

    ingest = result["speed"]["scifact"]["ingest"]
    assert ingest["service_memoised_vectors"]["documents"] == ingest["service_with_embedding"]["documents"] == 6
    assert "cisi" not in result["speed"] or "ingest" not in result["speed"]["cisi"]
    assert "skipped" in result["quality"]["cisi"]["service"]["hybrid_rerank_builtin"] or \
        result["quality"]["cisi"]["service"]["hybrid_rerank_builtin"]["model_version"]

    for name in ("scifact", "cisi"):
        bm25 = result["bm25"][name]
        _score(bm25["bm25s"])
        if bench.DEFAULT_TANTIVY_PYTHON.is_file():
            _score(bm25["tantivy_en_stem"])
            assert set(bm25["winner"]) == {"build", "query_p50", "query_p99", "ndcg10", "memory"}
        else:
            assert "peers_retrieval.sh" in bm25["tantivy"]["skipped"]

    memory = result["memory"]
    assert memory["scifact_chunks"]["bytes_per_10k_chunks"]["faiss_flat"] == 10_000 * 384 * 4
    assert memory["scifact_chunks"]["hnsw_vs_flat"]["hnsw_recall10"] == 1.0  # 36 vectors: the graph sees them all
    for rows in (memory["scaling"]["random_unit"], memory["scaling"]["scifact_jittered"]):
        assert [r["n"] for r in rows] == [300, 600]
        assert all(0.0 <= r["hnsw_recall10"] <= 1.0 for r in rows)
    backends = memory["backends_bytes_per_10k_chunks"]
    assert backends["local_bm25_plus_hnsw"] == memory["scifact_chunks"]["bm25_plus_hnsw_per_10k"]
    pg = memory["pgvector"]
    if "skipped" in pg:
        assert "pgserver" in pg["skipped"] and backends["pgvector_chunk_vectors"] == pg
    else:
        assert pg["documents"] == 36 and pg["chunks"] == memory["scifact_chunks"]["chunks"]
        vectors = pg["bytes"]["chunk_vectors"]
        assert set(vectors["indexes"]) >= {"ix_chunk_vectors_embedding", "ix_chunk_vectors_terms"}
        assert vectors["total"] >= vectors["table"] + sum(vectors["indexes"].values())
        # 10k rows of vector(384) alone are 15.36 MB of float32: the table and its indexes hold at least that
        assert pg["search_bytes_per_10k_chunks"] >= 10_000 * 384 * 4
        assert pg["with_store_of_record_per_10k_chunks"] > pg["search_bytes_per_10k_chunks"]
        assert backends["pgvector_chunk_vectors"] == pg["search_bytes_per_10k_chunks"]


def _check_goals(service: dict[str, Any], goals: dict[str, Any]) -> None:
    best_single = max(service["sparse"]["ndcg10"], service["dense"]["ndcg10"])
    for key, mode in (("hybrid_rrf_over_best_single", "hybrid"), ("hybrid_convex_over_best_single", "hybrid_convex")):
        goal = goals[key]
        assert goal["baseline_ndcg10"] == best_single and goal["ndcg10"] == service[mode]["ndcg10"]
        assert goal["met"] is (service[mode]["ndcg10"] - best_single >= 0.02 - 1e-9)
    best = goals["hybrid_best_over_best_single"]
    assert best["ndcg10"] == max(service["hybrid"]["ndcg10"], service["hybrid_convex"]["ndcg10"])
    assert best["fusion"] in ("rrf", "convex")
    cv = service["hybrid_rerank_crossval"]
    rerank = goals["rerank_crossval_over_hybrid"]
    assert rerank["gain"] == round(cv["ndcg10"] - cv["hybrid_ndcg10_same_folds"], 4)
    assert rerank["met"] is (rerank["gain"] >= 0.02 - 1e-9)
    assert goals["all_met"] is all(g["met"] for g in goals.values() if isinstance(g, dict))


@pytest.mark.skipif(not LANGCHAIN_PYTHON.is_file(), reason="no .peers/retrieval-langchain: run scripts/peers_retrieval.sh")
def test_langchain_peer_on_the_tiny_collection(tmp_path: Path) -> None:
    bench = load_bench()
    data = bench.write_tiny_collections(tmp_path / "data")
    result = bench.main(["--data", str(data), "--areas", "quality,speed", "--folds", "2", "--latency-queries", "8",
                         "--ingest-docs", "0", "--cache", str(tmp_path / "cache")])
    for name in ("scifact", "cisi"):
        peer = result["quality"][name]["peers"]["langchain_ensemble"]
        _score(peer)
        assert peer["queries"] == 12 and peer["versions"]["langchain-classic"]
        _score(peer["bm25_alone"])
        _score(peer["faiss_alone"])
        # same vectors, whole documents, exact search: LangChain's FAISS half ranks as the FAISS peer does
        assert peer["faiss_alone"]["ndcg10"] == result["quality"][name]["peers"]["faiss_flat_direct"]["ndcg10"]
        assert result["quality"][name]["ratios"]["service_hybrid_over_langchain_ndcg10"] > 0
        speed = result["speed"][name]
        assert speed["peers"]["langchain_ensemble"]["n"] == 8
        assert speed["ratios"]["hybrid_p50_service_over_langchain"] > 0


def test_missing_langchain_venv_is_skipped_with_the_reason(tmp_path: Path) -> None:
    bench = load_bench()
    missing = tmp_path / "no-venv" / "bin" / "python"
    args = argparse.Namespace(langchain_python=str(missing), smoke=False)
    assert bench.run_langchain(None, [], [], None, {}, args) == {
        "skipped": f"{missing} is missing: run scripts/peers_retrieval.sh"}


def test_missing_tantivy_venv_is_skipped_with_the_reason(tmp_path: Path) -> None:
    bench = load_bench()
    missing = tmp_path / "no-venv" / "bin" / "python"
    result = bench.main(["--smoke", "--areas", "bm25", "--tantivy-python", str(missing)])
    for name in ("scifact", "cisi"):
        assert result["bm25"][name]["tantivy"]["skipped"] == f"{missing} is missing: run scripts/peers_retrieval.sh"
        _score(result["bm25"][name]["bm25s"])
    assert result["bm25"]["verdict"] == "tantivy not measured"
    assert "quality" not in result and "memory" not in result
