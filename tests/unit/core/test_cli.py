"""The `llmo` command itself: bench output is pure JSON, areas are listed, errors are clear."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = '''
import structlog

from llmo.core.logging import get_logger


def main(argv):
    get_logger("bench").warning("noisy log line", argv=argv)
    structlog.get_logger().warning("another one")
    return {"area": "toy", "argv": argv, "ratio": 2.5}
'''


def run_llmo(*args: str, bench_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLMO_BENCHMARKS_DIR": str(bench_dir)}
    return subprocess.run(
        [sys.executable, "-m", "llmo.cli.main", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_bench_prints_one_json_object_and_logs_to_stderr(tmp_path: Path) -> None:
    (tmp_path / "bench_toy.py").write_text(BENCH)
    result = run_llmo("bench", "toy", "--size", "3", bench_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"area": "toy", "argv": ["--size", "3"], "ratio": 2.5}
    assert "noisy log line" in result.stderr


def test_bench_lists_areas_and_rejects_unknown_ones(tmp_path: Path) -> None:
    (tmp_path / "bench_toy.py").write_text(BENCH)
    assert run_llmo("bench", "--list", bench_dir=tmp_path).stdout.split() == ["toy"]
    unknown = run_llmo("bench", "nope", bench_dir=tmp_path)
    assert unknown.returncode != 0 and "unknown benchmark area 'nope'" in unknown.stderr
