"""Type-check every `llmo.*` package, services included, as one namespace.

`setup.py` maps `services/<name>` onto `llmo.<name>` at install time, which mypy
cannot follow (an editable install resolves through an import hook), so the
services would type as `Any` to each other and to `libs/`. This script lays the
same mapping out as symlinks in `.mypy_tree/llmo/` and runs mypy over it, with
`ignore_missing_imports` off for our own packages: an import of a `llmo.*`
module that does not exist is an error.

    python scripts/typecheck.py            # what `make lint` runs
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / ".mypy_tree"


def lay_out_tree() -> Path:
    if TREE.exists():
        shutil.rmtree(TREE)
    package = TREE / "llmo"
    package.mkdir(parents=True)
    for entry in sorted((ROOT / "libs" / "llmo").iterdir()):
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for service in sorted((ROOT / "services").iterdir()):
        if (service / "__init__.py").exists():
            if (package / service.name).exists():
                raise SystemExit(f"services/{service.name} would shadow libs/llmo/{service.name}")
            (package / service.name).symlink_to(service)
    return TREE


def main(argv: list[str]) -> int:
    tree = lay_out_tree()
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "llmo", *argv]
    result = subprocess.run(command, cwd=tree, env={**os.environ, "MYPYPATH": str(tree)}, check=False)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
