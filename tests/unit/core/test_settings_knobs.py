"""Settings classes: derived prefixes, platform fallbacks, and one documented list of every knob."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic_settings import SettingsConfigDict

from llmo.cli.config import all_knobs, readme_path, render_markdown, settings_classes
from llmo.core.settings import (
    SERVICES,
    OpsSettings,
    PlatformSettings,
    ServiceSettings,
    service_env_prefix,
)
from llmo.router.settings import RouterSettings

ROOT = Path(__file__).resolve().parents[3]
# A raw read of an LLMO_* variable: os.environ.get / os.environ[...] / os.getenv / click envvar= / C++ getenv.
_RAW_READ = re.compile(r"""(?:environ(?:\.get)?\(?\[?|getenv\(|envvar=)\s*["'](LLMO_[A-Z0-9_]+)["']""")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in __import__("os").environ if n.upper().startswith("LLMO_")]:
        monkeypatch.delenv(name)


def test_service_prefix_is_derived_from_the_service_name(monkeypatch: pytest.MonkeyPatch) -> None:
    class ToySettings(ServiceSettings):
        service: ClassVar[str] = "retrieval"
        top_k: int = 10

    monkeypatch.setenv("LLMO_RETRIEVAL_TOP_K", "3")
    monkeypatch.setenv("LLMO_RETRIEVAL_GRPC_PORT", "6000")
    toy = ToySettings()
    assert (toy.top_k, toy.resolved_grpc_port()) == (3, 6000)
    # the base class and the other services keep their own prefixes
    assert ServiceSettings.model_config.get("env_prefix") == ""
    assert RouterSettings.model_config["env_prefix"] == "LLMO_ROUTER_"


def test_a_hand_typed_prefix_that_disagrees_is_refused() -> None:
    with pytest.raises(TypeError, match="derived from service='cost'"):
        class Wrong(ServiceSettings):
            model_config = SettingsConfigDict(env_prefix="LLMO_COSTS_")
            service: ClassVar[str] = "cost"


def test_every_service_settings_class_uses_its_derived_prefix() -> None:
    services = {scope: cls for scope, cls in settings_classes() if scope in SERVICES}
    assert {"router", "inference", "cost"} <= set(services)
    for service, cls in services.items():
        assert cls.model_config["env_prefix"] == service_env_prefix(service)
        assert "env_prefix" not in (ROOT / "services" / service / "settings.py").read_text()


def test_router_targets_fall_back_to_the_platform_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    assert RouterSettings().cost_target == "" and RouterSettings().inference_http_url == "http://127.0.0.1:8000"
    platform = PlatformSettings(cost_address="cost:50056", inference_http_url="http://inference:8000")
    routed = RouterSettings(platform=platform)
    assert (routed.cost_target, routed.inference_http_url) == ("cost:50056", "http://inference:8000")
    assert RouterSettings(platform=platform, cost_target="").cost_target == ""  # explicitly off
    monkeypatch.setenv("LLMO_COST_ADDRESS", "10.0.0.1:50056")
    monkeypatch.setenv("LLMO_ROUTER_INFERENCE_HTTP_URL", "http://own:1")
    monkeypatch.setenv("LLMO_INFERENCE_HTTP_URL", "http://shared:2")
    from_env = RouterSettings()
    assert (from_env.cost_target, from_env.inference_http_url) == ("10.0.0.1:50056", "http://own:1")


def test_every_platform_field_is_read_somewhere() -> None:
    code = "\n".join(p.read_text() for p in [*ROOT.glob("services/*/*.py"), *ROOT.glob("libs/llmo/[!p]*/*.py")])
    unread = [name for name in PlatformSettings.model_fields if not re.search(rf"\.{name}\b|\"{name}\"", code)]
    assert unread == []


def test_ops_backend_is_a_validated_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMO_OPS_BACKEND", "reference")
    assert OpsSettings().backend == "reference"
    monkeypatch.setenv("LLMO_OPS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="reference"):
        OpsSettings()


def test_every_environment_variable_the_code_reads_is_a_documented_knob() -> None:
    documented = {knob.env for knob in all_knobs()}
    files = [*ROOT.glob("libs/llmo/**/*.py"), *ROOT.glob("services/**/*.py"), *ROOT.glob("native/csrc/**/*.cpp")]
    read = {name: path for path in files for name in _RAW_READ.findall(path.read_text())}
    assert "LLMO_NATIVE_ISA" in read  # the pattern does see real reads
    assert {name: str(path) for name, path in read.items() if name not in documented} == {}


def test_every_knob_has_an_environment_name_and_a_type() -> None:
    knobs = all_knobs()
    assert len({(k.scope, k.env) for k in knobs}) == len(knobs)
    assert all(k.env.startswith("LLMO_") and k.type for k in knobs)


def test_readme_table_is_generated_from_the_settings_classes() -> None:
    table = render_markdown()
    assert "`LLMO_COST_INGEST_BATCH`" in table and "`LLMO_OPS_BACKEND`" in table
    assert table in readme_path().read_text(), "README.md is stale: run python scripts/gen_settings_table.py"


def test_table_script_finds_and_rewrites_a_stale_table(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(readme_path().read_text().replace("`LLMO_COST_INGEST_BATCH`", "`LLMO_COST_OLD_KNOB`"))

    def script(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(ROOT / "scripts" / "gen_settings_table.py"), "--readme", str(readme), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    stale = script("--check")
    assert stale.returncode == 1 and "stale" in stale.stderr
    assert script().returncode == 0
    assert script("--check").returncode == 0 and readme.read_text() == readme_path().read_text()
