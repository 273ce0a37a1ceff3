"""Maps the repository layout onto one `llmo` import namespace.

`libs/llmo` holds the shared code (`llmo.core`, `llmo.protos`, ...) and each
`services/<name>` folder becomes `llmo.<name>`, so every service is importable
as `llmo.<name>` while its code stays in its own folder.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _layout() -> tuple[list[str], dict[str, str]]:
    package_dir = {"llmo": "libs/llmo"}
    packages = ["llmo", *(f"llmo.{p}" for p in find_packages("libs/llmo"))]
    for service in sorted((ROOT / "services").iterdir()):
        if (service / "__init__.py").exists():
            name = f"llmo.{service.name}"
            package_dir[name] = f"services/{service.name}"
            packages.append(name)
            packages += [f"{name}.{p}" for p in find_packages(str(service))]
    return packages, package_dir


packages, package_dir = _layout()
setup(
    packages=packages,
    package_dir=package_dir,
    include_package_data=True,
    # Data files ship with their package; Alembic folders are not packages, so name them.
    package_data={
        "": [
            "*.yaml", "*.json", "*.ini", "*.mako", "*.pyi", "py.typed", "*.safetensors", "*.txt",
            "migrations/*.py", "migrations/*.mako", "migrations/versions/*.py",
        ]
    },
)
