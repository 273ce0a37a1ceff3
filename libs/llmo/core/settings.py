"""Every configuration knob of the platform, read from the environment.

Platform-wide knobs use the `LLMO_` prefix (`LLMO_ENV`, `LLMO_DATA_DIR`,
`LLMO_NATS_URL`, `LLMO_API_KEYS`, `LLMO_ADMIN_TENANTS`, ...). Each service adds its own knobs under
`LLMO_<SERVICE>_` by subclassing `ServiceSettings` and naming its `service` (the prefix is derived
from it: `LLMO_COST_GRPC_PORT`, `LLMO_COST_DATABASE_URL`). The `llmo` command, the op registry
(`llmo.ops`) and the native kernels have their own classes below. Document a knob with a docstring
under it (or a comment above it): `llmo config` and the README table are generated from these classes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

SERVICES: tuple[str, ...] = ("router", "inference", "retrieval", "evaluation", "visibility", "cost")

# Default ports: gRPC, Prometheus metrics and (for the services that speak it) HTTP.
DEFAULT_GRPC_PORTS: dict[str, int] = {
    "router": 50051,
    "inference": 50052,
    "retrieval": 50053,
    "evaluation": 50054,
    "visibility": 50055,
    "cost": 50056,
}
DEFAULT_METRICS_PORTS: dict[str, int] = {
    "router": 9091,
    "inference": 9092,
    "retrieval": 9093,
    "evaluation": 9094,
    "visibility": 9095,
    "cost": 9096,
}
DEFAULT_HTTP_PORTS: dict[str, int] = {"router": 8080, "inference": 8000}

# json_schema_extra key naming the PlatformSettings field a service knob falls back to.
PLATFORM_FALLBACK = "platform_fallback"


def parse_api_keys(raw: str | dict[str, str] | None) -> dict[str, str]:
    """Parse `LLMO_API_KEYS`: `key1=tenant-a,key2=tenant-b` or a JSON object."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.strip()
    if text.startswith("{"):
        parsed = json.loads(text)
        if not isinstance(parsed, dict):
            raise ValueError("LLMO_API_KEYS JSON must be an object of key -> tenant")
        return {str(k): str(v) for k, v in parsed.items()}
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, tenant = item.partition("=")
        if not sep or not key or not tenant:
            raise ValueError(f"LLMO_API_KEYS entry {item!r} is not key=tenant")
        keys[key.strip()] = tenant.strip()
    return keys


def parse_admin_tenants(raw: str | Iterable[str] | None) -> frozenset[str]:
    """Parse `LLMO_ADMIN_TENANTS`: `finops,router` (comma-separated) or a JSON array."""
    if raw is None or raw == "":
        return frozenset()
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("["):
            items = [str(item) for item in json.loads(text)]
        else:
            items = text.split(",")
    else:
        items = [str(item) for item in raw]
    return frozenset(name for name in (item.strip() for item in items) if name)


class PlatformSettings(BaseSettings):
    """Knobs shared by every service and the `llmo` command (`LLMO_*`)."""

    model_config = SettingsConfigDict(env_prefix="LLMO_", extra="ignore", use_attribute_docstrings=True)

    env: Literal["dev", "prod"] = "dev"
    """`prod` switches logs to JSON."""
    log_level: str = "info"
    """Log level of the services (debug, info, warning, error)."""
    data_dir: Path = Path(".llmo")
    """Where embedded state lives: SQLite files, the NATS JetStream store, logs, models."""
    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server (`llmo up` sets it to the embedded one)."""
    api_keys: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    """API key -> tenant, as `key=tenant,key2=tenant2` or a JSON object; callers send
    `authorization: Bearer <key>`. Empty: authentication off (development only), every call
    is attributed to `default_tenant`."""
    default_tenant: str = "default"
    """Tenant of every call while authentication is off."""
    admin_tenants: Annotated[frozenset[str], NoDecode] = Field(default_factory=frozenset)
    """Tenants whose keys act across tenants (FinOps operators, service identities such as the
    router, which checks budgets for end tenants), comma-separated. Only meaningful with
    api_keys set: with authentication off every caller acts across tenants."""
    drain_seconds: float = 10.0
    """Seconds a stopping server waits for in-flight calls before cancelling them."""
    cost_address: str = ""
    """The cost service's gRPC `host:port` (`llmo up` sets it; in Kubernetes a Service DNS name);
    the router's budget checks use it unless `LLMO_ROUTER_COST_TARGET` is set."""
    inference_http_url: str = ""
    """The inference service's OpenAI-compatible base URL (`llmo up` sets it); the router's
    default portfolio uses it unless `LLMO_ROUTER_INFERENCE_HTTP_URL` is set."""
    router_http_url: str = ""
    """The router's OpenAI-compatible base URL (`llmo up` sets it); retrieval's generator (query
    expansion, HyDE) calls it unless `LLMO_RETRIEVAL_GENERATOR_URL` is set."""
    otel_endpoint: str = Field(
        default="",
        description="OTLP/gRPC collector (host:port, http:// or https://) that receives trace spans; empty: tracing off.",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: Any) -> dict[str, str]:
        return parse_api_keys(value)

    @field_validator("admin_tenants", mode="before")
    @classmethod
    def _parse_admin_tenants(cls, value: Any) -> frozenset[str]:
        return parse_admin_tenants(value)


def platform_fallback(field: str) -> dict[str, Any]:
    """`json_schema_extra` of a service knob that, when not set, takes `PlatformSettings.<field>` if that is set."""
    if field not in PlatformSettings.model_fields:
        raise ValueError(f"PlatformSettings has no field {field!r}")
    return {PLATFORM_FALLBACK: field}


def fallback_of(info: FieldInfo) -> str | None:
    """The PlatformSettings field a knob falls back to (see `platform_fallback`)."""
    extra = info.json_schema_extra
    return str(extra[PLATFORM_FALLBACK]) if isinstance(extra, dict) and PLATFORM_FALLBACK in extra else None


def service_env_prefix(service: str) -> str:
    return f"LLMO_{service.upper()}_"


class ServiceSettings(BaseSettings):
    """Knobs of one service, under `LLMO_<SERVICE>_`.

    Subclasses set `service`; the environment prefix is derived from it.
    """

    model_config = SettingsConfigDict(extra="ignore", use_attribute_docstrings=True)
    service: ClassVar[str] = ""

    host: str = "127.0.0.1"
    """Interface the service listens on."""
    grpc_port: int = 0
    """gRPC port; 0 picks the service's default (router 50051, inference 50052, ..., cost 50056)."""
    metrics_port: int = 0
    """Prometheus `/metrics` port; 0 picks the default (9091 ... 9096 in the same order), -1 disables it."""
    database_url: str = ""
    """SQLAlchemy URL (`postgresql://...` uses psycopg 3); empty: a SQLite file `<data_dir>/<service>.db`."""
    platform: PlatformSettings = Field(default_factory=PlatformSettings)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if not cls.service:
            return
        prefix = service_env_prefix(cls.service)
        typed = cls.model_config.get("env_prefix")
        if typed and typed != prefix:
            raise TypeError(f"{cls.__name__}: env_prefix is derived from service={cls.service!r}; do not set it")
        # Every pydantic class holds its own merged model_config dict, so this changes only cls (and its subclasses).
        cls.model_config["env_prefix"] = prefix

    @model_validator(mode="after")
    def _apply_platform_fallbacks(self) -> Self:
        for name, info in type(self).model_fields.items():
            source = fallback_of(info)
            if source and name not in self.model_fields_set and getattr(self.platform, source):
                setattr(self, name, getattr(self.platform, source))
        return self

    def resolved_grpc_port(self) -> int:
        return self.grpc_port or DEFAULT_GRPC_PORTS[self.service]

    def resolved_metrics_port(self) -> int | None:
        if self.metrics_port < 0:
            return None
        return self.metrics_port or DEFAULT_METRICS_PORTS[self.service]

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        path = (self.platform.data_dir / f"{self.service}.db").resolve()
        return f"sqlite:///{path}"


class CommandSettings(BaseSettings):
    """Knobs of the `llmo` command itself (`LLMO_*`): its logs, `llmo bench`, the client subcommands."""

    model_config = SettingsConfigDict(env_prefix="LLMO_", extra="ignore", use_attribute_docstrings=True)

    log_level: str = "warning"
    """The same variable as the services' log level, but the `llmo` command defaults to `warning`
    (its logs go to stderr; stdout carries only results)."""
    benchmarks_dir: str = ""
    """Folder of the `bench_<area>.py` files `llmo bench` runs; empty: the repository's `tests/benchmarks`."""
    api_key: str = ""
    """API key (Bearer) the client subcommands (`llmo cost ...`, `llmo retrieval ...`, `llmo eval ...`) present when the service requires one."""
    cost_endpoint: str = ""
    """Cost service `host:port` for `llmo cost ...`; empty: the running `llmo up` stack's, else 127.0.0.1:50056."""
    retrieval_endpoint: str = ""
    """Retrieval service `host:port` for `llmo retrieval ...`; empty: the running `llmo up` stack's, else 127.0.0.1:50053."""
    evaluation_endpoint: str = ""
    """Evaluation service `host:port` for `llmo eval ...`; empty: the running `llmo up` stack's, else 127.0.0.1:50054."""
    visibility_endpoint: str = ""
    """Visibility service `host:port` for `llmo visibility ...`; empty: the running `llmo up` stack's, else 127.0.0.1:50055."""


class OpsSettings(BaseSettings):
    """Knobs of the op registry `llmo.ops` (`LLMO_OPS_*`), read once when `llmo.ops` is imported."""

    model_config = SettingsConfigDict(env_prefix="LLMO_OPS_", extra="ignore", use_attribute_docstrings=True)

    backend: Literal["", "reference", "cpu", "cuda", "triton"] = ""
    """Force one backend for every op (`reference` = the pure PyTorch oracle); empty: the best
    available backend per device."""


class NativeSettings(BaseSettings):
    """Knobs of the native kernels `llmo_native` (`LLMO_NATIVE_*`), read by its C++/CMake code, not by Python."""

    model_config = SettingsConfigDict(env_prefix="LLMO_NATIVE_", extra="ignore", use_attribute_docstrings=True)

    isa: Literal["", "generic", "avx2", "avx512vnni"] = ""
    """CPU kernel path, read by `llmo_native` when its kernels are first used; a path the CPU
    lacks is ignored. Empty: the best the CPU supports."""
    cuda: Literal["auto", "on", "off"] = "auto"
    """Build time (`make native`): build the CUDA kernels; `auto` builds them whenever CMake finds `nvcc`."""
