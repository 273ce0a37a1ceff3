"""Every configuration knob of the platform, read from the environment.

Platform-wide knobs use the `LLMO_` prefix (`LLMO_ENV`, `LLMO_DATA_DIR`,
`LLMO_NATS_URL`, `LLMO_API_KEYS`, `LLMO_ADMIN_TENANTS`, ...). Each service adds its own knobs under
`LLMO_<SERVICE>_` by subclassing `ServiceSettings` (for example
`LLMO_COST_GRPC_PORT`, `LLMO_COST_DATABASE_URL`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator
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

    model_config = SettingsConfigDict(env_prefix="LLMO_", extra="ignore")

    env: Literal["dev", "prod"] = "dev"
    log_level: str = "info"
    # Where embedded state lives: SQLite files, the NATS JetStream store, models.
    data_dir: Path = Path(".llmo")
    nats_url: str = "nats://127.0.0.1:4222"
    # API key -> tenant. Empty means authentication is off (development only):
    # every call is attributed to `default_tenant`.
    api_keys: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    default_tenant: str = "default"
    # Tenants whose keys act across tenants (FinOps operators, service identities
    # such as the router, which checks budgets for end tenants). Only meaningful
    # with api_keys set: with authentication off every caller acts across tenants.
    admin_tenants: Annotated[frozenset[str], NoDecode] = Field(default_factory=frozenset)
    # Seconds a stopping server waits for in-flight calls before cancelling them.
    drain_seconds: float = 10.0
    # Where the other services are (host:port for gRPC, base URL for HTTP); empty
    # means "not deployed". `llmo up` sets them; in Kubernetes they are Service DNS names.
    router_address: str = ""
    inference_address: str = ""
    retrieval_address: str = ""
    evaluation_address: str = ""
    visibility_address: str = ""
    cost_address: str = ""
    router_http_url: str = ""
    inference_http_url: str = ""
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


class ServiceSettings(BaseSettings):
    """Knobs of one service, under `LLMO_<SERVICE>_`.

    Subclasses set `service` and `model_config = SettingsConfigDict(env_prefix=...)`.
    """

    model_config = SettingsConfigDict(extra="ignore")
    service: ClassVar[str] = ""

    host: str = "127.0.0.1"
    # 0 picks the service's default port; see DEFAULT_GRPC_PORTS.
    grpc_port: int = 0
    # Prometheus /metrics; 0 picks the default, -1 disables it.
    metrics_port: int = 0
    # SQLAlchemy URL; empty means a SQLite file `<data_dir>/<service>.db`.
    database_url: str = ""
    platform: PlatformSettings = Field(default_factory=PlatformSettings)

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


def service_env_prefix(service: str) -> str:
    return f"LLMO_{service.upper()}_"
