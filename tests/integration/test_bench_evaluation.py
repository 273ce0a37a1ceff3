"""`llmo bench evaluation --smoke` runs end to end without ../shared or the peers' virtualenv, and its
JSON says what it measured (and that the peers were skipped, with the reason)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def test_the_smoke_bench_measures_the_service_and_reports_skipped_peers() -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_evaluation.py"
    spec = importlib.util.spec_from_file_location("bench_evaluation_smoke", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    result = module.main(["--smoke"])
    assert "detector" not in result  # it needs ../shared
    level = result["reliability"]["levels"][0]
    assert 0.0 < level["reported_alpha"] <= 1.0 and 0.0 <= level["reported_flip_rate"] <= 1.0
    assert 0.0 <= level["ci_coverage"] <= 1.0 and level["trials"] == 4
    ours = result["orchestration"]["ours"]
    assert ours["state"] == "RUN_STATE_SUCCEEDED" and ours["judge_calls_per_example"] == 1.0
    assert 0.0 < ours["mean_faithfulness"] < 1.0  # half the answers carry unsupported claims
    assert all("skipped" in peer for peer in result["orchestration"]["peers"].values())
