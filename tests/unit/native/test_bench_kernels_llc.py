"""`llmo bench kernels` sizes its rotated buffers from the machine's last-level cache."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


def load_bench() -> ModuleType:
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("bench_kernels_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_cache(root: Path, caches: dict[str, tuple[int, str]]) -> Path:
    for name, (level, size) in caches.items():
        (root / name).mkdir(parents=True)
        (root / name / "level").write_text(f"{level}\n")
        (root / name / "size").write_text(f"{size}\n")
    return root


def test_llc_is_the_highest_cache_level(tmp_path: Path) -> None:
    bench = load_bench()
    sysfs = fake_cache(tmp_path, {"index0": (1, "48K"), "index2": (2, "2048K"), "index3": (3, "491520K")})
    assert bench.llc_mib(str(sysfs)) == 480.0


def test_llc_falls_back_to_32_mib_without_sysfs(tmp_path: Path) -> None:
    assert load_bench().llc_mib(str(tmp_path / "missing")) == 32.0


def test_default_rotation_exceeds_the_llc() -> None:
    bench = load_bench()
    args = bench._parse([])
    assert args.rotate_mb > bench.llc_mib() and args.stream_mb >= 2 * bench.llc_mib()


def test_unreadable_cache_sizes_are_skipped(tmp_path: Path) -> None:
    sysfs = fake_cache(tmp_path, {"index2": (2, "2048K"), "index3": (3, "")})
    assert load_bench().llc_mib(str(sysfs)) == 2.0
