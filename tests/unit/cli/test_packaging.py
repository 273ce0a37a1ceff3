"""Installing the `llmo` command: setuptools finds every package without warnings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_build_collects_every_package_without_discovery_warnings(tmp_path: Path) -> None:
    # build_py is the step of `pip install -e .` that warns about importable folders
    # missing from `packages` (Alembic folders without __init__.py, for example).
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "absent from the `packages` configuration" not in result.stderr
    assert "Warning:" not in result.stderr, result.stderr
    assert (tmp_path / "llmo/cost/migrations/versions/0001_initial.py").is_file()
    assert (tmp_path / "llmo/cost/migrations/script.py.mako").is_file()
