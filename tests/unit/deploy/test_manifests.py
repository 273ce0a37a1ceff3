"""deploy/ stays consistent with the code and hardened.

Every YAML parses; every file a kustomization names exists; exactly the implemented
services have a folder under deploy/kustomize/services, a Dockerfile target and an
image in the build script; the one service template is hardened; the NATS configs are
accepted by a real nats-server, which also accepts every stream definition. With
`kubectl` (`kubectl kustomize`, no cluster), every overlay is built and checked: one
Deployment per implemented service, ports equal to llmo.core.settings (read back through
each service's own settings class), native gRPC probes, hardened pods, resolvable
ConfigMap/Secret references, every LLMO_ variable a real knob, and the router wired to
inference and cost with its keys from a Secret.
"""

from __future__ import annotations

import base64
import functools
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
import pytest
import yaml
from nats.js.api import StreamConfig
from pydantic import AliasChoices

from llmo.cli.stack import implemented_services
from llmo.core.events import DUPLICATE_WINDOW_SECONDS, EventBus, stream_name
from llmo.core.natsd import free_port, nats_server_binary, wait_for_port
from llmo.core.settings import (
    DEFAULT_GRPC_PORTS,
    DEFAULT_HTTP_PORTS,
    DEFAULT_METRICS_PORTS,
    SERVICES,
    PlatformSettings,
    ServiceSettings,
    parse_admin_tenants,
    parse_api_keys,
)
from llmo.inference.settings import InferenceSettings
from llmo.router.settings import RouterSettings

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
TEMPLATE = KUSTOMIZE / "base" / "service"
OVERLAYS = ("dev", "prod")
IMPLEMENTED = tuple(implemented_services())
# Secrets an SRE creates outside git (deploy/README.md); optional refs may be absent too.
OUT_OF_BAND_SECRETS = {"llmo-api-keys", "llmo-router-keys", "llmo-router-postgres", "llmo-cost-postgres",
                       "llmo-retrieval-postgres", "llmo-evaluation-postgres", "llmo-visibility-postgres"}
# What the out-of-band secrets hold, for reading an overlay's environment (well-formed stand-ins).
OUT_OF_BAND_STAND_INS = {"llmo-api-keys": "stand-in-key=stand-in-tenant"}
# Variables a service reads other than as a settings knob: the router's generated portfolio names
# its inference key by env var (`api_key_env`); the test checks that it still does.
READ_OUTSIDE_SETTINGS = {"LLMO_ROUTER_INFERENCE_API_KEY"}

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


def _drain_problems(name: str, workload: Manifest, config_drain: str) -> list[str]:
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    problems = []
    if not {v["mountPath"] for v in container["volumeMounts"]} >= {"/var/lib/llmo", "/tmp"}:
        problems.append(f"{name}: no writable /var/lib/llmo and /tmp")
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = {e["name"]: e.get("value") for e in container["env"]}.get("LLMO_DRAIN_SECONDS") or config_drain
    if pod["terminationGracePeriodSeconds"] <= sleep + float(drain):
        problems.append(f"{name}: grace period does not cover preStop + drain")
    return problems


def _config_drain() -> str:
    (base,) = _documents(KUSTOMIZE / "base" / "kustomization.yaml")
    (config,) = [g for g in base["configMapGenerator"] if g["name"] == "llmo-config"]
    return dict(item.split("=", 1) for item in config["literals"])["LLMO_DRAIN_SECONDS"]


def test_every_yaml_parses() -> None:
    files = _yaml_files()
    assert len(files) >= 20
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
    assert references or kustomization.get("replacements"), f"{path} does nothing"
    for reference in references:
        target = (path.parent / reference).resolve()
        assert target.exists(), f"{path}: {reference} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), f"{path}: {reference} is not a kustomization"


def test_exactly_the_implemented_services_are_deployed() -> None:
    assert IMPLEMENTED and set(IMPLEMENTED) <= set(SERVICES)
    services = KUSTOMIZE / "services"
    assert {p.name for p in services.iterdir() if p.is_dir()} == set(IMPLEMENTED)
    (registry,) = _documents(services / "kustomization.yaml")
    assert sorted(registry["resources"]) == sorted(IMPLEMENTED)
    # Nothing else carries a Deployment of its own: every service comes from the template.
    patches = {
        (k.parent / patch["path"]).resolve()
        for k in _kustomizations()
        for patch in _documents(k)[0].get("patches", [])
        if "path" in patch
    }
    deployments = {p for p in _yaml_files() for d in _documents(p) if d.get("kind") == "Deployment"}
    assert deployments - patches == {TEMPLATE / "deployment.yaml"}


@pytest.mark.parametrize("service", IMPLEMENTED)
def test_service_values_match_the_settings(service: str) -> None:
    (values,) = _documents(KUSTOMIZE / "services" / service / "values.yaml")
    assert values["metadata"]["annotations"]["config.kubernetes.io/local-config"] == "true"
    assert values["data"] == {
        "name": service,
        "env-name": service.upper(),
        "grpc-port": str(DEFAULT_GRPC_PORTS[service]),
        "metrics-port": str(DEFAULT_METRICS_PORTS[service]),
    }


def test_template_pod_is_hardened_and_drains() -> None:
    (deployment,) = _documents(TEMPLATE / "deployment.yaml")
    assert _hardening_problems("template", deployment) == []
    assert _drain_problems("template", deployment, _config_drain()) == []
    (container,) = _containers(deployment)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(container[probe]) & {"grpc", "httpGet", "exec", "tcpSocket"} == {"grpc"}, probe


def test_checker_reports_an_unhardened_pod() -> None:
    (deployment,) = _documents(TEMPLATE / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    pod["securityContext"]["runAsNonRoot"] = False
    pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    pod["terminationGracePeriodSeconds"] = 25
    assert _hardening_problems("cost", deployment) == [
        "cost: pod lacks runAsNonRoot",
        "cost/SERVICE: root filesystem is writable",
    ]
    assert _drain_problems("cost", deployment, "20") == ["cost: grace period does not cover preStop + drain"]


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


@pytest.mark.parametrize("service", IMPLEMENTED)
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
    assert set(stages) == {"build", "runtime", *IMPLEMENTED}
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


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_build_script_builds_exactly_the_implemented_images() -> None:
    result = subprocess.run(
        ["sh", str(DEPLOY / "build-images.sh"), "dev", "--pull"],
        env={**os.environ, "DOCKER": "echo docker"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    root = str(DEPLOY.parent)
    assert result.stdout.splitlines() == [
        f"docker build -f {DEPLOY / 'Dockerfile'} --target {s} -t llmo/{s}:dev --pull {root}"
        for s in IMPLEMENTED
    ]


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


needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl not installed (apt-get install kubectl): the kustomize overlays are not built",
)


@functools.cache
def _render(path: Path) -> str:
    result = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _build(overlay: str) -> list[Manifest]:
    """The overlay as `kubectl kustomize` renders it (a fresh copy per call)."""
    return [d for d in yaml.safe_load_all(_render(KUSTOMIZE / "overlays" / overlay)) if d]


def _one(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    (found,) = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    return found


def _generated(manifests: list[Manifest], kind: str, name: str) -> Manifest | None:
    """A generated ConfigMap/Secret by its name before the hash suffix."""
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"].rsplit("-", 1)[0] == name]
    return found[0] if found else None


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


def _environment(manifests: list[Manifest], deployment: Manifest) -> dict[str, str]:
    """The container's environment as the kubelet builds it; out-of-band secrets read `<secret/key>`."""
    (container,) = _containers(deployment)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_one(manifests, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            env[item["name"]] = item["value"]
            continue
        secrets = [m for m in manifests if m["kind"] == "Secret" and m["metadata"]["name"] == ref["name"]]
        if secrets:
            env[item["name"]] = base64.b64decode(secrets[0]["data"][ref["key"]]).decode()
        elif not ref.get("optional"):
            env[item["name"]] = OUT_OF_BAND_STAND_INS.get(ref["name"], f"<{ref['name']}/{ref['key']}>")
    return env


def _settings_class(service: str) -> type[ServiceSettings]:
    module = importlib.import_module(f"llmo.{service}.settings")
    (cls,) = [
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, ServiceSettings) and getattr(v, "service", "") == service
    ]
    return cls


def _settings(monkeypatch: pytest.MonkeyPatch, service: str, env: dict[str, str]) -> ServiceSettings:
    """The service's settings parsed from exactly this environment (nothing of the test runner's)."""
    for name in list(os.environ):
        if name.startswith("LLMO_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return _settings_class(service)()


def _knobs(cls: type[PlatformSettings] | type[ServiceSettings]) -> set[str]:
    """Every environment variable name the settings class reads."""
    prefix = str(cls.model_config.get("env_prefix") or "")
    names: set[str] = set()
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(c.upper() for c in alias.choices if isinstance(c, str))
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def _service_pairs() -> list[tuple[str, str]]:
    return [(overlay, service) for overlay in OVERLAYS for service in IMPLEMENTED]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_references_resolve(overlay: str) -> None:
    manifests = _build(overlay)
    emitted = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    deployments = {m["metadata"]["name"] for m in manifests if m["kind"] == "Deployment"}
    assert deployments == set(IMPLEMENTED)
    assert all(m["metadata"].get("namespace") == "llmo" for m in manifests if m["kind"] != "Namespace")
    # Template placeholders and local-config values never reach the cluster.
    rendered = _render(KUSTOMIZE / "overlays" / overlay)
    assert "SERVICE" not in rendered
    assert not re.search(r"\bport: 0\b|containerPort: 0\b|\"0\"$", rendered, re.MULTILINE)
    assert not any(m["metadata"]["name"].startswith(("llmo-service", "llmo-images")) for m in manifests)
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
@pytest.mark.parametrize(("overlay", "service"), _service_pairs())
def test_service_ports_match_the_settings(
    overlay: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = _build(overlay)
    deployment = _one(manifests, "Deployment", service)
    (container,) = _containers(deployment)
    expected = {"grpc": DEFAULT_GRPC_PORTS[service], "metrics": DEFAULT_METRICS_PORTS[service]}
    if service in DEFAULT_HTTP_PORTS:
        expected["http"] = DEFAULT_HTTP_PORTS[service]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == expected
    service_ports = {p["name"]: p["port"] for p in _one(manifests, "Service", service)["spec"]["ports"]}
    assert service_ports == expected
    headless = _one(manifests, "Service", f"{service}-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert {p["name"]: p["port"] for p in headless["ports"]} == {"grpc": expected["grpc"]}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(expected["metrics"])
    assert container["args"] == ["serve", service]
    # The service itself, reading this environment, listens where the manifests say.
    settings = _settings(monkeypatch, service, _environment(manifests, deployment))
    assert settings.host == "0.0.0.0"
    assert settings.resolved_grpc_port() == expected["grpc"]
    assert settings.resolved_metrics_port() == expected["metrics"]
    if "http" in expected:
        assert isinstance(settings, RouterSettings | InferenceSettings)
        assert settings.resolved_http_port() == expected["http"]
    env = {e["name"]: e for e in container["env"]}
    assert env["LLMO_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"].startswith("llmo-api-keys")
    database = env[f"LLMO_{service.upper()}_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert database["name"].startswith(f"llmo-{service}-database")


@needs_kubectl
@pytest.mark.parametrize(("overlay", "service"), _service_pairs())
def test_service_probes_are_native_grpc(overlay: str, service: str) -> None:
    (container,) = _containers(_one(_build(overlay), "Deployment", service))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": DEFAULT_GRPC_PORTS[service]}, probe
        assert set(container[probe]) & {"httpGet", "exec", "tcpSocket"} == set(), probe


@needs_kubectl
@pytest.mark.parametrize(("overlay", "service"), _service_pairs())
def test_service_pods_are_hardened_and_drain(overlay: str, service: str) -> None:
    manifests = _build(overlay)
    deployment = _one(manifests, "Deployment", service)
    assert _hardening_problems(service, deployment) == []
    config = _generated(manifests, "ConfigMap", "llmo-config")
    assert config is not None
    assert _drain_problems(service, deployment, config["data"]["LLMO_DRAIN_SECONDS"]) == []
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == service
    _one(manifests, "ServiceAccount", service)
    budget = _one(manifests, "PodDisruptionBudget", service)
    selector = {"app.kubernetes.io/name": service}
    assert deployment["spec"]["selector"]["matchLabels"] == selector
    assert deployment["spec"]["template"]["metadata"]["labels"].items() >= selector.items()
    assert budget["spec"]["selector"]["matchLabels"] == selector
    assert _one(manifests, "Service", service)["spec"]["selector"] == selector


@needs_kubectl
@pytest.mark.parametrize(("overlay", "image"), [("dev", "llmo/{}:dev"), ("prod", "ghcr.io/llmo/{}:0.1.0")])
def test_service_images_are_pinned(overlay: str, image: str) -> None:
    manifests = _build(overlay)
    images = {
        m["metadata"]["name"]: _containers(m)[0]["image"] for m in manifests if m["kind"] == "Deployment"
    }
    assert images == {service: image.format(service) for service in IMPLEMENTED}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_router_is_wired_to_inference_and_cost(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = _build(overlay)
    router = _one(manifests, "Deployment", "router")
    env = {e["name"]: e for e in _containers(router)[0]["env"]}
    for name, key in (("LLMO_ROUTER_COST_API_KEY", "cost"), ("LLMO_ROUTER_INFERENCE_API_KEY", "inference")):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"].startswith("llmo-router-keys") and ref["key"] == key and not ref.get("optional")
    settings = _settings(monkeypatch, "router", _environment(manifests, router))
    assert isinstance(settings, RouterSettings)
    # The cost address is a Service of this overlay whose gRPC port reaches the cost pods.
    host, port = settings.cost_target.rsplit(":", 1)
    assert (host, int(port)) == ("cost", DEFAULT_GRPC_PORTS["cost"])
    cost_ports = {p["name"]: p["port"] for p in _one(manifests, "Service", host)["spec"]["ports"]}
    assert cost_ports["grpc"] == int(port)
    url = urlsplit(settings.inference_http_url)
    assert (url.scheme, url.hostname, url.port) == ("http", "inference", DEFAULT_HTTP_PORTS["inference"])
    inference_ports = {p["name"]: p["port"] for p in _one(manifests, "Service", "inference")["spec"]["ports"]}
    assert inference_ports["http"] == url.port
    assert settings.cost_api_key


@needs_kubectl
def test_dev_router_keys_are_admin_keys_of_cost_and_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = _build("dev")
    env = {
        s: _environment(manifests, _one(manifests, "Deployment", s)) for s in ("router", "inference", "cost")
    }
    router = _settings(monkeypatch, "router", env["router"])
    assert isinstance(router, RouterSettings)
    cost = _settings(monkeypatch, "cost", env["cost"])
    inference = _settings(monkeypatch, "inference", env["inference"])
    # Each callee maps the router's key to a tenant it lets act for end tenants.
    assert cost.platform.api_keys[router.cost_api_key] in cost.platform.admin_tenants
    inference_key = env["router"]["LLMO_ROUTER_INFERENCE_API_KEY"]
    assert inference.platform.api_keys[inference_key] in inference.platform.admin_tenants
    assert parse_admin_tenants(env["cost"]["LLMO_ADMIN_TENANTS"]) == {"router"}
    assert parse_api_keys(env["cost"]["LLMO_API_KEYS"])["dev-key"] == "dev"


@needs_kubectl
@pytest.mark.parametrize(("overlay", "service"), _service_pairs())
def test_every_llmo_variable_is_a_real_knob(overlay: str, service: str) -> None:
    manifests = _build(overlay)
    env = _environment(manifests, _one(manifests, "Deployment", service))
    knobs = _knobs(PlatformSettings) | _knobs(_settings_class(service))
    unknown = {name for name in env if name.startswith("LLMO_") and name not in knobs}
    assert unknown == (READ_OUTSIDE_SETTINGS & set(env)), f"{overlay}/{service}: not a knob: {sorted(unknown)}"
    from llmo.router.default_portfolio import INFERENCE_KEY_ENV

    assert READ_OUTSIDE_SETTINGS == {INFERENCE_KEY_ENV}, "the router's portfolio reads another key variable"
    assert not READ_OUTSIDE_SETTINGS & knobs


@needs_kubectl
def test_a_new_service_needs_only_its_folder_and_one_line(tmp_path: Path) -> None:
    """The recipe of deploy/README.md ("Adding a service"), applied to a copy of deploy/."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    # Every service of the platform is deployed today: the recipe is tried on a seventh, made up.
    new, grpc_port, metrics_port = "ranking", 50099, 9099
    folder = copy / "kustomize" / "services" / new
    shutil.copytree(copy / "kustomize" / "services" / "cost", folder)
    (values,) = _documents(folder / "values.yaml")
    values["metadata"]["name"] = f"llmo-service-{new}"
    values["data"] = {
        "name": new,
        "env-name": new.upper(),
        "grpc-port": str(grpc_port),
        "metrics-port": str(metrics_port),
    }
    (folder / "values.yaml").write_text(yaml.safe_dump(values))
    (kustomization,) = _documents(folder / "kustomization.yaml")
    del kustomization["patches"]
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    registry_path = copy / "kustomize" / "services" / "kustomization.yaml"
    registry_path.write_text(registry_path.read_text() + f"  - {new}\n")
    for overlay in OVERLAYS:
        manifests = [d for d in yaml.safe_load_all(_render(copy / "kustomize" / "overlays" / overlay)) if d]
        deployment = _one(manifests, "Deployment", new)
        (container,) = _containers(deployment)
        assert container["image"].endswith(f"/{new}:{'dev' if overlay == 'dev' else '0.1.0'}")
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": grpc_port,
                                                                              "metrics": metrics_port}
        assert container["startupProbe"]["grpc"]["port"] == grpc_port
        assert {e["name"] for e in container["env"]} >= {f"LLMO_{new.upper()}_{k}" for k in ("HOST", "GRPC_PORT")}
        assert _hardening_problems(new, deployment) == []
        _one(manifests, "Service", f"{new}-headless")
        # The others are untouched by the new one.
        assert {m["metadata"]["name"] for m in manifests if m["kind"] == "Deployment"} == {*IMPLEMENTED, new}


@needs_kubectl
@pytest.mark.parametrize("service", IMPLEMENTED)
def test_every_service_folder_builds_alone(service: str) -> None:
    manifests = [d for d in yaml.safe_load_all(_render(KUSTOMIZE / "services" / service)) if d]
    assert sorted((m["kind"], m["metadata"]["name"]) for m in manifests) == sorted(
        [
            ("Deployment", service),
            ("PodDisruptionBudget", service),
            ("Service", service),
            ("Service", f"{service}-headless"),
            ("ServiceAccount", service),
        ]
    )


@needs_kubectl
def test_prod_overlay_uses_postgres_json_logs_and_replicas() -> None:
    manifests = _build("prod")
    config = _generated(manifests, "ConfigMap", "llmo-config")
    assert config is not None and config["data"]["LLMO_ENV"] == "prod"
    replicas = {m["metadata"]["name"]: m["spec"]["replicas"] for m in manifests if m["kind"] == "Deployment"}
    assert replicas == {"router": 3, "inference": 2, "retrieval": 2, "cost": 2, "evaluation": 1, "visibility": 1}
    urls = {
        m["metadata"]["name"].rsplit("-", 1)[0]: base64.b64decode(m["data"]["url"]).decode()
        for m in manifests
        if m["kind"] == "Secret" and "-database" in m["metadata"]["name"]
    }
    assert set(urls) == {"llmo-router-database", "llmo-cost-database", "llmo-retrieval-database",
                         "llmo-evaluation-database", "llmo-visibility-database"}
    assert all(url.startswith("postgresql+psycopg://") for url in urls.values())
    nats_set = next(m for m in manifests if m["kind"] == "StatefulSet")
    assert nats_set["spec"]["replicas"] == 3
    assert any(m["kind"] == "Job" and m["metadata"]["name"] == "nats-streams" for m in manifests)
    # No key of any kind is committed for production.
    assert _generated(manifests, "Secret", "llmo-api-keys") is None
    assert _generated(manifests, "Secret", "llmo-router-keys") is None


@needs_kubectl
def test_dev_overlay_runs_one_standalone_nats() -> None:
    manifests = _build("dev")
    nats_set = next(m for m in manifests if m["kind"] == "StatefulSet")
    assert nats_set["spec"]["replicas"] == 1
    (volume,) = [v for v in nats_set["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"].startswith("nats-config-standalone-")
    config = _generated(manifests, "ConfigMap", "llmo-config")
    assert config is not None and config["data"]["LLMO_ENV"] == "dev"
