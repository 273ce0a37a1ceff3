"""`llmo bench <area> --help` is the benchmark's own help; `llmo bench --help` is the command's."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from llmo.cli.main import cli

BENCH = '''
import argparse


def main(argv):
    parser = argparse.ArgumentParser(prog="llmo bench toy")
    parser.add_argument("--size", type=int, default=1, help="how many toys")
    return {"size": parser.parse_args(argv).size}
'''


@pytest.fixture
def bench_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "bench_toy.py").write_text(BENCH)
    monkeypatch.setenv("LLMO_BENCHMARKS_DIR", str(tmp_path))
    return tmp_path


def test_area_help_shows_the_benchmarks_options(bench_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["bench", "toy", "--help"])
    assert result.exit_code == 0, result.output
    assert "usage: llmo bench toy" in result.output and "how many toys" in result.output


def test_bench_help_without_an_area_is_the_commands_help(bench_dir: Path) -> None:
    for args in (["bench", "--help"], ["bench", "-h"]):
        result = CliRunner().invoke(cli, args, prog_name="llmo")
        assert result.exit_code == 0, result.output
        assert "Usage: llmo bench [OPTIONS] [AREA]" in result.output and "--list" in result.output


def test_arguments_still_reach_the_benchmark(bench_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["bench", "toy", "--size", "4"])
    assert result.exit_code == 0, result.output
    assert '"size": 4' in result.output
