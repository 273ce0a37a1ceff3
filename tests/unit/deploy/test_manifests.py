"""deploy/ stays consistent with the code and hardened.

Every YAML parses; every file a kustomization names exists; every service has a
component whose ports match llmo.core.settings and whose pods are hardened with
native gRPC probes; the Dockerfile has a non-root target per service; the NATS
configs are accepted by a real nats-server, which also accepts every stream
definition. Where `kubectl` is installed, the overlays are built and their
ConfigMap/Secret references checked.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from nats.js.api import StreamConfig

from llmo.core.events import DUPLICATE_WINDOW_SECONDS, EventBus, stream_name
from llmo.core.natsd import free_port, nats_server_binary, wait_for_port
from llmo.core.settings import (
    DEFAULT_GRPC_PORTS,
    DEFAULT_HTTP_PORTS,
    DEFAULT_METRICS_PORTS,
    SERVICES,
)

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
OVERLAYS = ("dev", "prod")
# Secrets an SRE creates outside git (deploy/README.md); optional refs may be absent too.
OUT_OF_BAND_SECRETS = {"llmo-api-keys", "llmo-router-postgres", "llmo-cost-postgres"}

Manifest = dict[str, Any]


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})


def _documents(path: Path) -> list[Manifest]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomizations() -> list[Path]:
    return [p for p in _yaml_files() if p.name == "kustomization.yaml"]


def _referenced_paths(kustomization: Manifest) -> Iterator[str]:
    yield from kustomization.get("resources", [])
    yield from kustomization.get("components", [])
    for patch in kustomization.get("patches", []):
        if "path" in patch:
            yield patch["path"]
    for generator in [
        *kustomization.get("configMapGenerator", []),
        *kustomization.get("secretGenerator", []),
    ]:
        for entry in [*generator.get("files", []), *generator.get("envs", [])]:
            yield entry.split("=", 1)[-1]


def _component(service: str) -> dict[str, Manifest]:
    folder = KUSTOMIZE / "components" / service
    return {
        d["kind"]: d for p in folder.glob("*.yaml") for d in _documents(p) if d.get("kind") != "Component"
    }


def _containers(workload: Manifest) -> list[Manifest]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def _hardening_problems(name: str, workload: Manifest) -> list[str]:
    pod = workload["spec"]["template"]["spec"]
    problems = []
    security = pod.get("securityContext", {})
    if security.get("runAsNonRoot") is not True:
        problems.append(f"{name}: pod lacks runAsNonRoot")
    if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{name}: pod lacks seccomp RuntimeDefault")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{name}: service account token is mounted")
    for container in pod["containers"]:
        c = container.get("securityContext", {})
        if c.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}/{container['name']}: root filesystem is writable")
        if c.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}/{container['name']}: privilege escalation allowed")
        if c.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{name}/{container['name']}: capabilities not dropped")
        resources = container.get("resources", {})
        if not resources.get("requests") or "memory" not in resources.get("limits", {}):
            problems.append(f"{name}/{container['name']}: no requests or memory limit")
    return problems


def test_every_yaml_parses() -> None:
    files = _yaml_files()
    assert len(files) >= 30
    for path in files:
        documents = _documents(path)
        assert documents, f"{path} is empty"
        for document in documents:
            assert isinstance(document, dict), path
            assert "kind" in document or path.name == "kustomization.yaml", path


@pytest.mark.parametrize("path", _kustomizations(), ids=lambda p: str(p.parent.relative_to(DEPLOY)))
def test_kustomization_references_exist(path: Path) -> None:
    (kustomization,) = _documents(path)
    references = list(_referenced_paths(kustomization))
    assert references, f"{path} references nothing"
    for reference in references:
        target = (path.parent / reference).resolve()
        assert target.exists(), f"{path}: {reference} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), f"{path}: {reference} is not a kustomization"


@pytest.mark.parametrize("service", SERVICES)
def test_component_ports_match_the_settings(service: str) -> None:
    manifests = _component(service)
    assert set(manifests) >= {"Deployment", "Service", "PodDisruptionBudget", "ServiceAccount"}
    (container,) = _containers(manifests["Deployment"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expected = {"grpc": DEFAULT_GRPC_PORTS[service], "metrics": DEFAULT_METRICS_PORTS[service]}
    if service in DEFAULT_HTTP_PORTS:
        expected["http"] = DEFAULT_HTTP_PORTS[service]
    assert ports == expected
    env = {e["name"]: e for e in container["env"]}
    prefix = f"LLMO_{service.upper()}_"
    assert env[f"{prefix}HOST"]["value"] == "0.0.0.0"
    assert env[f"{prefix}GRPC_PORT"]["value"] == str(expected["grpc"])
    assert env["LLMO_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "llmo-api-keys"
    database = env[f"{prefix}DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert database["name"] == f"llmo-{service}-database"
    assert container["args"] == ["serve", service]


@pytest.mark.parametrize("service", SERVICES)
def test_component_probes_are_native_grpc(service: str) -> None:
    deployment = _component(service)["Deployment"]
    (container,) = _containers(deployment)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == DEFAULT_GRPC_PORTS[service], probe
    service_ports = {p["name"]: p["port"] for p in _component(service)["Service"]["spec"]["ports"]}
    assert service_ports["grpc"] == DEFAULT_GRPC_PORTS[service]


@pytest.mark.parametrize("service", SERVICES)
def test_component_pods_are_hardened_and_drain(service: str) -> None:
    deployment = _component(service)["Deployment"]
    assert _hardening_problems(service, deployment) == []
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert {v["mountPath"] for v in container["volumeMounts"]} >= {"/var/lib/llmo", "/tmp"}
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = {e["name"]: e.get("value") for e in container["env"]}.get("LLMO_DRAIN_SECONDS") or _config_drain()
    assert pod["terminationGracePeriodSeconds"] > sleep + float(drain)


def _config_drain() -> str:
    (base,) = _documents(KUSTOMIZE / "base" / "kustomization.yaml")
    (config,) = [g for g in base["configMapGenerator"] if g["name"] == "llmo-config"]
    return dict(item.split("=", 1) for item in config["literals"])["LLMO_DRAIN_SECONDS"]


def test_nats_and_jobs_are_hardened() -> None:
    workloads = {
        "nats": _documents(KUSTOMIZE / "base" / "nats-statefulset.yaml")[0],
        "nats-streams": _documents(KUSTOMIZE / "components" / "nats-streams" / "job.yaml")[0],
    }
    for name, workload in workloads.items():
        assert _hardening_problems(name, workload) == []
    nats_set = workloads["nats"]
    assert nats_set["spec"]["replicas"] == 3
    assert nats_set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_checker_reports_an_unhardened_pod() -> None:
    deployment = _component("cost")["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    pod["securityContext"]["runAsNonRoot"] = False
    pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    assert _hardening_problems("cost", deployment) == [
        "cost: pod lacks runAsNonRoot",
        "cost/cost: root filesystem is writable",
    ]


def _dockerfile_stages() -> dict[str, list[str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match[2], [f"FROM {match[1]}"])
        elif line and not line.startswith("#"):
            current.append(line)
    return stages


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_has_a_target_per_service(service: str) -> None:
    stages = _dockerfile_stages()
    lines = stages[service]
    assert lines[0] == "FROM runtime"
    assert f'CMD ["serve", "{service}"]' in lines
    (expose,) = [line for line in lines if line.startswith("EXPOSE")]
    ports = {int(p) for p in expose.split()[1:]}
    expected = {DEFAULT_GRPC_PORTS[service], DEFAULT_METRICS_PORTS[service]}
    if service in DEFAULT_HTTP_PORTS:
        expected.add(DEFAULT_HTTP_PORTS[service])
    assert ports == expected
    assert f"LLMO_{service.upper()}_HOST=0.0.0.0" in " ".join(lines)


def test_dockerfile_runtime_is_non_root_and_built_natively() -> None:
    stages = _dockerfile_stages()
    assert set(stages) == {"build", "runtime", *SERVICES}
    users = [line.split()[1] for line in stages["runtime"] if line.startswith("USER")]
    assert users and not users[-1].startswith(("0", "root"))
    build = " ".join(stages["build"])
    assert "./native" in build and "torch==2.13.0" in build
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "llmo"]' in stages["runtime"]


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_dockerfile_run_steps_are_valid_shell() -> None:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    runs = [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")]
    assert len(runs) >= 6
    for run in runs:
        result = subprocess.run(["sh", "-n", "-c", run], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{run[:80]}: {result.stderr}"


def _stream_files() -> dict[str, Manifest]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((DEPLOY / "nats" / "streams").glob("*.json"))}


def test_stream_definitions_match_the_event_bus() -> None:
    streams = _stream_files()
    assert set(streams) == {f"llmo_{d}" for d in SERVICES} | {"llmo_dlq"}
    for domain in [*SERVICES, "dlq"]:
        config = streams[f"llmo_{domain}"]
        assert config["name"] == stream_name(domain)
        assert config["subjects"] == [f"llmo.{domain}.>"]
        assert config["storage"] == "file"
        assert config["num_replicas"] == 3
        assert config["duplicate_window"] == int(DUPLICATE_WINDOW_SECONDS * 1_000_000_000)


def _max_file_store(config_name: str) -> int:
    text = (DEPLOY / "nats" / config_name).read_text()
    match = re.search(r"max_file_store:\s*(\d+)([KMGT]?)B?\b", text)
    assert match, config_name
    return int(match[1]) * 1024 ** "_KMGT".index(match[2] or "_")


def test_streams_fit_the_cluster_file_store() -> None:
    # JetStream reserves each stream's max_bytes on every replica: the sum must fit one server.
    reserved = sum(s["max_bytes"] for s in _stream_files().values())
    assert 0 < reserved <= _max_file_store("nats-server.conf")


needs_nats = pytest.mark.skipif(
    shutil.which("nats-server") is None and not (Path(sys.executable).parent / "nats-server").exists(),
    reason="nats-server binary not installed",
)


@needs_nats
@pytest.mark.parametrize("name", ["nats-server.conf", "nats-standalone.conf"])
def test_nats_configs_are_valid(name: str) -> None:
    result = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(DEPLOY / "nats" / name)],
        env={**os.environ, "POD_NAME": "nats-0"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def standalone_nats(tmp_path: Path) -> Iterator[str]:
    """The dev overlay's nats-server config, run for real with a temp store and free ports."""
    config = (DEPLOY / "nats" / "nats-standalone.conf").read_text()
    port = free_port()
    config = config.replace("store_dir: /data/jetstream", f"store_dir: {tmp_path / 'js'}")
    config = config.replace("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{port}")
    config = config.replace("http: 0.0.0.0:8222", f"http: 127.0.0.1:{free_port()}")
    config = config.replace("/var/run/nats/nats.pid", str(tmp_path / "nats.pid"))
    # The production budget, so stream reservations are checked against it (nothing is allocated).
    config = re.sub(r"max_file_store: \S+", f"max_file_store: {_max_file_store('nats-server.conf')}", config)
    path = tmp_path / "nats.conf"
    path.write_text(config)
    process = subprocess.Popen(
        [nats_server_binary(), "-c", str(path)],
        env={**os.environ, "POD_NAME": "nats-test"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port, 15)
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@needs_nats
async def test_nats_accepts_every_stream_definition(standalone_nats: str) -> None:
    connection = await nats.connect(standalone_nats)
    try:
        js = connection.jetstream()
        for raw in _stream_files().values():
            # One server: R1. Everything else exactly as provisioned in production.
            config = StreamConfig.from_response({**raw, "num_replicas": 1})
            info = await js.add_stream(config)
            assert info.config.subjects == raw["subjects"]
            assert info.config.duplicate_window == pytest.approx(DUPLICATE_WINDOW_SECONDS)
    finally:
        await connection.close()
    # The services' event bus keeps a pre-provisioned stream instead of failing.
    async with EventBus(standalone_nats) as bus:
        assert await bus.ensure_stream("cost") == "LLMO_COST"
        info = await bus.js.stream_info("LLMO_COST")
        assert info.config.max_age == pytest.approx(_stream_files()["llmo_cost"]["max_age"] / 1e9)


needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")


def _build(overlay: str) -> list[Manifest]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(KUSTOMIZE / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _references(manifest: Manifest) -> Iterator[tuple[str, str, bool]]:
    """(kind, name, optional) of every ConfigMap/Secret a workload reads."""
    pod = manifest["spec"]["template"]["spec"]
    for container in pod["containers"]:
        for source in container.get("envFrom", []):
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in source:
                    yield kind, source[key]["name"], bool(source[key].get("optional"))
        for env in container.get("env", []):
            for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                ref = env.get("valueFrom", {}).get(key)
                if ref:
                    yield kind, ref["name"], bool(ref.get("optional"))
    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            yield "ConfigMap", volume["configMap"]["name"], False


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_references_resolve(overlay: str) -> None:
    manifests = _build(overlay)
    emitted = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    deployments = {m["metadata"]["name"] for m in manifests if m["kind"] == "Deployment"}
    assert deployments == {"router", "inference", "cost"}
    assert all(m["metadata"].get("namespace") == "llmo" for m in manifests if m["kind"] != "Namespace")
    for manifest in manifests:
        if manifest["kind"] not in {"Deployment", "StatefulSet", "Job"}:
            continue
        for kind, name, optional in _references(manifest):
            if (kind, name) in emitted or optional:
                continue
            assert overlay == "prod" and kind == "Secret" and name in OUT_OF_BAND_SECRETS, (
                f"{overlay}: {manifest['metadata']['name']} reads missing {kind} {name}"
            )


@needs_kubectl
def test_prod_overlay_uses_postgres_json_logs_and_replicas() -> None:
    manifests = _build("prod")
    config = next(
        m for m in manifests if m["kind"] == "ConfigMap" and m["metadata"]["name"].startswith("llmo-config")
    )
    assert config["data"]["LLMO_ENV"] == "prod"
    replicas = {m["metadata"]["name"]: m["spec"]["replicas"] for m in manifests if m["kind"] == "Deployment"}
    assert replicas == {"router": 3, "inference": 2, "cost": 2}
    urls = {
        m["metadata"]["name"].rsplit("-", 1)[0]: base64.b64decode(m["data"]["url"]).decode()
        for m in manifests
        if m["kind"] == "Secret" and "-database" in m["metadata"]["name"]
    }
    assert set(urls) == {"llmo-router-database", "llmo-cost-database"}
    assert all(url.startswith("postgresql+psycopg://") for url in urls.values())
    nats_set = next(m for m in manifests if m["kind"] == "StatefulSet")
    assert nats_set["spec"]["replicas"] == 3
    assert any(m["kind"] == "Job" and m["metadata"]["name"] == "nats-streams" for m in manifests)


@needs_kubectl
def test_dev_overlay_runs_one_standalone_nats() -> None:
    manifests = _build("dev")
    nats_set = next(m for m in manifests if m["kind"] == "StatefulSet")
    assert nats_set["spec"]["replicas"] == 1
    (volume,) = [v for v in nats_set["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"].startswith("nats-config-standalone-")
    config = next(
        m for m in manifests if m["kind"] == "ConfigMap" and m["metadata"]["name"].startswith("llmo-config")
    )
    assert config["data"]["LLMO_ENV"] == "dev"
