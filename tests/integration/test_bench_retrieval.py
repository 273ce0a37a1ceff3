"""`llmo bench retrieval --smoke` runs every area end to end on a generated tiny collection: the real
service in-process over gRPC, the direct bm25s / FAISS peers, the BM25 library subprocesses and the
HNSW scaling, and prints one JSON object (no data from ../shared)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_retrieval.py"


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
        for mode in ("sparse", "dense", "hybrid", "hybrid_rerank_crossval"):
            _score(quality["service"][mode])
        for peer in ("bm25s_direct", "faiss_flat_direct", "rrf_of_direct"):
            _score(quality["peers"][peer])
        assert quality["service"]["hybrid_rerank_crossval"]["folds"] == 2
        speed = result["speed"][name]
        for mode in ("sparse", "dense", "hybrid", "hybrid_rerank"):
            assert speed["service"][mode]["n"] == 8 and speed["service"][mode]["p99_ms"] >= speed["service"][mode]["p50_ms"]
        assert speed["peers"]["bm25s_direct"]["n"] == 8
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


def test_missing_tantivy_venv_is_skipped_with_the_reason(tmp_path: Path) -> None:
    bench = load_bench()
    missing = tmp_path / "no-venv" / "bin" / "python"
    result = bench.main(["--smoke", "--areas", "bm25", "--tantivy-python", str(missing)])
    for name in ("scifact", "cisi"):
        assert result["bm25"][name]["tantivy"]["skipped"] == f"{missing} is missing: run scripts/peers_retrieval.sh"
        _score(result["bm25"][name]["bm25s"])
    assert result["bm25"]["verdict"] == "tantivy not measured"
    assert "quality" not in result and "memory" not in result
