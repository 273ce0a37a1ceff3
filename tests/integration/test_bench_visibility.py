"""`llmo bench visibility`: the smoke run measures every area end to end (generated extraction benchmark, the
local test site, no ../shared, no peers' venv: the peers are reported as skipped with the reason), and the
numbers it reports agree with what it measured."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_visibility.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_visibility_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_rate_helpers_count_requests_in_a_sliding_window() -> None:
    bench = load_bench()
    assert bench.max_in_window([0.0, 0.5, 0.99, 1.6]) == 3  # 0, 0.5 and 0.99 lie within one second
    assert bench.max_in_window([0.0, 1.0, 2.0]) == 1  # the window is half-open
    assert bench.max_in_window([]) == 0
    assert bench.min_gap([2.0, 0.0, 0.5]) == 0.5 and bench.min_gap([1.0]) is None
    check = bench.rate_check([0.0, 0.5, 1.0, 1.5], expected_rate=2.0)
    assert check["met"] and check["max_in_any_1s_window"] == 2
    assert not bench.rate_check([0.0, 0.1, 1.0], expected_rate=2.0)["met"]
    assert bench.rounded({"a": [1.234567, 2], "b": float("nan")}) == {"a": [1.2346, 2], "b": None}


def test_the_generated_benchmark_loads_and_scores_a_known_truth(tmp_path: Path) -> None:
    bench = load_bench()
    from llmo.visibility import extraction_eval

    items = extraction_eval.load_benchmark(bench.write_tiny_benchmark(tmp_path))
    assert len(items) == 5 and all(item.truth and item.url for item in items)
    report = extraction_eval.evaluate_extractor(items, lambda html, url: next(i.truth for i in items if i.html == html))
    assert report.f1 == 1.0
    with pytest.raises(SystemExit):
        bench.parse_args(["--areas", "extraction,nonsense"])


def test_without_the_peers_venv_readability_is_skipped_with_the_reason(tmp_path: Path) -> None:
    bench = load_bench()
    data = bench.write_tiny_benchmark(tmp_path / "data")
    result = bench.main(["--areas", "extraction", "--data", str(data), "--quiet",
                         "--peers-python", str(tmp_path / "missing" / "python")])
    extraction = result["extraction"]
    assert "scripts/peers_visibility.sh" in extraction["peers"]["readability_lxml"]["skipped"]
    assert extraction["items"] == 5 and set(extraction["ratios_ours_over_peer"]) == {"trafilatura_default"}
    assert result["machine"]["peer_packages"] is None


def test_the_smoke_bench_measures_every_area_and_reports_skipped_peers(tmp_path: Path) -> None:
    bench = load_bench()
    from llmo.visibility.netguard import ssrf_address_forms

    out = tmp_path / "result.json"
    result = bench.main(["--smoke", "--quiet", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["machine"]["cores"] >= 1 and "--smoke" in result["command"]
    assert set(result["timings_s"]) == {"extraction", "crawl", "sov", "ssrf"}

    extraction = result["extraction"]
    assert extraction["items"] == extraction["ours"]["items"] == extraction["peers"]["trafilatura_default"]["items"] == 5
    assert 0.0 <= extraction["ours"]["f1"] <= 1.0
    assert extraction["goal"]["met"] == (extraction["ours"]["f1"] >= 0.95)
    assert "--smoke" in extraction["peers"]["readability_lxml"]["skipped"]

    crawl = result["crawl"]
    ours = crawl["ours"]
    assert ours["state"] == "JOB_STATE_SUCCEEDED"
    assert 0 < ours["pages"] == ours["progress"]["fetched"] + ours["progress"]["failed"] <= 30
    assert ours["site_requests"]["article"] >= ours["progress"]["fetched"] - 1  # all but the start page
    assert "--smoke" in crawl["scrapy"]["skipped"]
    assert crawl["ratio_ours_over_scrapy"] is None and crawl["goal"]["met"] is None
    plain = crawl["ours_without_relevance"]
    assert plain["state"] == "JOB_STATE_SUCCEEDED" and plain["pages"] == ours["pages"]
    assert "MiniLM" in ours["work"] and "MiniLM" not in plain["work"]
    scored = crawl["in_process"]["parse_extract_score"]
    assert scored["pages"] == 31  # the start page and the 30 articles
    assert crawl["in_process"]["goal"]["met"] == (scored["pages_per_cpu_s"] >= 100)
    polite = crawl["politeness_check"]
    assert set(polite["cases"]) == {"site_robots_crawl_delay_1s", "robots_without_crawl_delay"}
    for case in polite["cases"].values():
        assert case["state"] == "JOB_STATE_SUCCEEDED" and case["page_fetches"]["requests"] == 3
        assert case["all_requests"]["requests"] > case["page_fetches"]["requests"]  # robots.txt, sitemaps
        assert case["met"] == (case["page_fetches"]["met"] and case["all_requests"]["met"])
    assert polite["cases"]["site_robots_crawl_delay_1s"]["expected_max_rate"] == 1.0  # Crawl-delay wins over 2/s
    assert polite["met"] == all(c["met"] for c in polite["cases"].values())

    cells = result["sov"]["cells"]
    assert len(cells) == 6 and {(c["true_rate"], c["prompt_spread"]) for c in cells} == {
        (r, s) for r in (0.1, 0.3, 0.5) for s in (0.0, 0.15)}
    for cell in cells:
        assert 0.0 <= cell["coverage"] <= 1.0 and cell["mean_ci_width"] > 0
        assert cell["met"] == (0.93 <= cell["coverage"] <= 0.97)

    ssrf = result["ssrf"]
    assert ssrf["forms"] == ssrf["tried"] == ssrf["refused"] == len(ssrf_address_forms())
    assert ssrf["connections_opened"] == 0 and ssrf["dns_lookups"] == 0
    assert ssrf["metadata_redirect"]["outcome"] == "SSRF_BLOCKED" and ssrf["met"] is True


@pytest.mark.skipif(not load_bench().DEFAULT_PEERS_PYTHON.is_file(),
                    reason="the peers' venv is missing: scripts/peers_visibility.sh builds it")
def test_readability_extracts_the_same_items(tmp_path: Path) -> None:
    bench = load_bench()
    data = bench.write_tiny_benchmark(tmp_path / "data")
    result = bench.main(["--areas", "extraction", "--data", str(data), "--quiet"])
    readability = result["extraction"]["peers"]["readability_lxml"]
    assert readability["items"] == 5 and readability["raised_on"] == []
    assert readability["recall"] > 0.9  # the article's paragraphs are found
