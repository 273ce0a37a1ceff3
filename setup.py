"""Maps the repository layout onto one `llmo` import namespace.

`libs/llmo` holds the shared code (`llmo.core`, `llmo.protos`, ...) and each
`services/<name>` folder becomes `llmo.<name>`, so every service is importable
as `llmo.<name>` while its code stays in its own folder.
"""

import warnings
from pathlib import Path

from setuptools import setup
from setuptools.warnings import InformationOnly

ROOT = Path(__file__).parent

# This note asks to beware of a `llmo/` folder in the working directory shadowing the
# package; the repository has none (the package lives in libs/llmo), so it never applies.
warnings.filterwarnings("ignore", message="Editable installation", category=InformationOnly)


def _subpackages(root: Path, name: str) -> list[str]:
    """`name` and every folder under `root` holding Python files (Alembic folders have no __init__.py)."""
    found = [name]
    for folder in sorted(p for p in root.rglob("*") if p.is_dir() and p.name != "__pycache__"):
        if any(folder.glob("*.py")):
            found.append(".".join([name, *folder.relative_to(root).parts]))
    return found


def _layout() -> tuple[list[str], dict[str, str]]:
    package_dir = {"llmo": "libs/llmo"}
    packages = _subpackages(ROOT / "libs/llmo", "llmo")
    for service in sorted((ROOT / "services").iterdir()):
        if (service / "__init__.py").exists():
            name = f"llmo.{service.name}"
            package_dir[name] = f"services/{service.name}"
            packages += _subpackages(service, name)
    return packages, package_dir


packages, package_dir = _layout()
setup(
    packages=packages,
    package_dir=package_dir,
    include_package_data=True,
    package_data={
        "": ["*.yaml", "*.json", "*.ini", "*.mako", "*.pyi", "py.typed", "*.safetensors", "*.txt"]
    },
)
