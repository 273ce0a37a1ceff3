"""Prompt registry: named templates, immutable numbered versions, labels, validated rendering,
token counts per version and a token audit. Templates use `{{variable}}` placeholders.

Blocking SQL: call from a worker thread in async code. Errors are `ServiceError`s with the
reasons documented in router_service.proto.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llmo.core.errors import already_exists, invalid_argument, not_found
from llmo.router.store import prompt_labels, prompt_templates, prompt_versions
from llmo.router.tokens import count_tokens

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_BRACES = re.compile(r"\{\{|\}\}")
RESOURCE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
LABEL = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
DEFAULT_LABEL = "production"
# Tenant and template id are stored as one key so templates never cross tenants.
_SEP = "/"


@dataclass(frozen=True)
class TemplateInfo:
    template_id: str
    description: str
    created_at: float
    labels: dict[str, int]
    latest_version: int

    @property
    def name(self) -> str:
        return f"promptTemplates/{self.template_id}"


@dataclass(frozen=True)
class VersionInfo:
    template_id: str
    version: int
    body: str
    variables: list[str]
    token_count: int
    created_at: float
    labels: list[str]

    @property
    def name(self) -> str:
        return f"promptTemplates/{self.template_id}/versions/{self.version}"


def template_variables(body: str) -> list[str]:
    """Sorted placeholder names; raises ValueError on unbalanced or malformed braces."""
    stripped = PLACEHOLDER.sub("", body)
    if _BRACES.search(stripped):
        raise ValueError("template has '{{' or '}}' that is not a {{variable}} placeholder")
    return sorted(set(PLACEHOLDER.findall(body)))


def render_template(body: str, variables: dict[str, str]) -> str:
    expected = set(template_variables(body))
    missing = sorted(expected - variables.keys())
    if missing:
        raise invalid_argument("MISSING_VARIABLE", f"missing variables: {', '.join(missing)}", missing=",".join(missing))
    unknown = sorted(variables.keys() - expected)
    if unknown:
        raise invalid_argument(
            "UNKNOWN_VARIABLE", f"unknown variables: {', '.join(unknown)}", unknown=",".join(unknown)
        )
    return PLACEHOLDER.sub(lambda m: variables[m.group(1)], body)


def parse_template_name(name: str) -> str:
    prefix = "promptTemplates/"
    tid = name[len(prefix) :] if name.startswith(prefix) else ""
    if not RESOURCE_ID.match(tid):
        raise invalid_argument("INVALID_NAME", f"expected promptTemplates/{{id}}, got {name!r}", name=name)
    return tid


def parse_version_name(name: str) -> tuple[str, int]:
    m = re.match(r"^promptTemplates/([a-z0-9][a-z0-9_-]{0,62})/versions/([1-9][0-9]*)$", name)
    if not m:
        raise invalid_argument(
            "INVALID_NAME", f"expected promptTemplates/{{id}}/versions/{{n}}, got {name!r}", name=name
        )
    return m.group(1), int(m.group(2))


class PromptRegistry:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @staticmethod
    def _key(tenant: str, template_id: str) -> str:
        return f"{tenant}{_SEP}{template_id}"

    def create_template(self, tenant: str, template_id: str, description: str = "") -> TemplateInfo:
        if not RESOURCE_ID.match(template_id):
            raise invalid_argument("INVALID_ID", f"template id must match {RESOURCE_ID.pattern}", id=template_id)
        key = self._key(tenant, template_id)
        with self.engine.begin() as conn:
            if conn.execute(sa.select(prompt_templates.c.name).where(prompt_templates.c.name == key)).first():
                raise already_exists("PROMPT_EXISTS", f"promptTemplates/{template_id} already exists")
            conn.execute(sa.insert(prompt_templates).values(name=key, description=description, created_at=time.time()))
        return self.get_template(tenant, template_id)

    def get_template(self, tenant: str, template_id: str) -> TemplateInfo:
        key = self._key(tenant, template_id)
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(prompt_templates).where(prompt_templates.c.name == key)).mappings().first()
            if row is None:
                raise not_found("PROMPT_NOT_FOUND", f"promptTemplates/{template_id} not found")
            labels: dict[str, int] = dict(
                conn.execute(
                    sa.select(prompt_labels.c.label, prompt_labels.c.version).where(prompt_labels.c.template == key)
                ).all()
            )
            latest = conn.execute(
                sa.select(sa.func.max(prompt_versions.c.version)).where(prompt_versions.c.template == key)
            ).scalar()
        return TemplateInfo(template_id, row["description"], row["created_at"], labels, int(latest or 0))

    def list_templates(self, tenant: str, after: str, limit: int) -> list[TemplateInfo]:
        prefix = f"{tenant}{_SEP}"
        with self.engine.connect() as conn:
            keys = conn.execute(
                sa.select(prompt_templates.c.name)
                .where(prompt_templates.c.name.startswith(prefix, autoescape=True))
                .where(prompt_templates.c.name > prefix + after)
                .order_by(prompt_templates.c.name)
                .limit(limit)
            ).scalars()
            ids = [k[len(prefix) :] for k in keys]
        return [self.get_template(tenant, i) for i in ids]

    def create_version(self, tenant: str, template_id: str, body: str, labels: list[str]) -> VersionInfo:
        if not body.strip():
            raise invalid_argument("EMPTY_BODY", "prompt body is empty")
        try:
            variables = template_variables(body)
        except ValueError as exc:
            raise invalid_argument("INVALID_TEMPLATE", str(exc)) from exc
        for label in labels:
            if not LABEL.match(label):
                raise invalid_argument("INVALID_LABEL", f"label must match {LABEL.pattern}", label=label)
        self.get_template(tenant, template_id)
        key = self._key(tenant, template_id)
        tokens = count_tokens(PLACEHOLDER.sub("", body))
        with self.engine.begin() as conn:
            latest = conn.execute(
                sa.select(sa.func.max(prompt_versions.c.version)).where(prompt_versions.c.template == key)
            ).scalar()
            version = int(latest or 0) + 1
            conn.execute(
                sa.insert(prompt_versions).values(
                    template=key,
                    version=version,
                    body=body,
                    variables=variables,
                    token_count=tokens,
                    created_at=time.time(),
                )
            )
            for label in labels:
                self._set_label(conn, key, label, version)
        return self.get_version(tenant, template_id, version)

    @staticmethod
    def _set_label(conn: sa.Connection, key: str, label: str, version: int) -> None:
        where = (prompt_labels.c.template == key) & (prompt_labels.c.label == label)
        if conn.execute(sa.select(prompt_labels.c.label).where(where)).first():
            conn.execute(sa.update(prompt_labels).where(where).values(version=version))
        else:
            conn.execute(sa.insert(prompt_labels).values(template=key, label=label, version=version))

    def set_label(self, tenant: str, template_id: str, label: str, version: int) -> TemplateInfo:
        if not LABEL.match(label):
            raise invalid_argument("INVALID_LABEL", f"label must match {LABEL.pattern}", label=label)
        self.get_version(tenant, template_id, version)
        with self.engine.begin() as conn:
            self._set_label(conn, self._key(tenant, template_id), label, version)
        return self.get_template(tenant, template_id)

    def get_version(self, tenant: str, template_id: str, version: int) -> VersionInfo:
        key = self._key(tenant, template_id)
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    sa.select(prompt_versions).where(
                        prompt_versions.c.template == key, prompt_versions.c.version == version
                    )
                )
                .mappings()
                .first()
            )
            if row is None:
                self.get_template(tenant, template_id)
                raise not_found("VERSION_NOT_FOUND", f"promptTemplates/{template_id}/versions/{version} not found")
            labels = sorted(
                conn.execute(
                    sa.select(prompt_labels.c.label).where(
                        prompt_labels.c.template == key, prompt_labels.c.version == version
                    )
                ).scalars()
            )
        return VersionInfo(
            template_id, version, row["body"], list(row["variables"]), row["token_count"], row["created_at"], labels
        )

    def list_versions(self, tenant: str, template_id: str, after: int, limit: int) -> list[VersionInfo]:
        self.get_template(tenant, template_id)
        key = self._key(tenant, template_id)
        with self.engine.connect() as conn:
            numbers = conn.execute(
                sa.select(prompt_versions.c.version)
                .where(prompt_versions.c.template == key, prompt_versions.c.version > after)
                .order_by(prompt_versions.c.version)
                .limit(limit)
            ).scalars()
            wanted = list(numbers)
        return [self.get_version(tenant, template_id, v) for v in wanted]

    def resolve(self, tenant: str, template_id: str, version: int = 0, label: str = "") -> VersionInfo:
        """A version by number, else by label (default `production`), else the latest."""
        if version > 0:
            return self.get_version(tenant, template_id, version)
        info = self.get_template(tenant, template_id)
        if label:
            if label not in info.labels:
                raise not_found("LABEL_NOT_FOUND", f"promptTemplates/{template_id} has no label {label!r}")
            return self.get_version(tenant, template_id, info.labels[label])
        if DEFAULT_LABEL in info.labels:
            return self.get_version(tenant, template_id, info.labels[DEFAULT_LABEL])
        if info.latest_version == 0:
            raise not_found("VERSION_NOT_FOUND", f"promptTemplates/{template_id} has no versions")
        return self.get_version(tenant, template_id, info.latest_version)

    def render(
        self, tenant: str, template_id: str, variables: dict[str, str], version: int = 0, label: str = ""
    ) -> tuple[str, VersionInfo]:
        info = self.resolve(tenant, template_id, version, label)
        return render_template(info.body, variables), info

    def audit(self, tenant: str, offset: int, limit: int) -> tuple[list[tuple[VersionInfo, float]], int]:
        """Versions of the tenant's templates, longest first, with their share of all prompt tokens."""
        prefix = f"{tenant}{_SEP}"
        tmpl = prompt_versions.c.template.startswith(prefix, autoescape=True)
        with self.engine.connect() as conn:
            total = int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(prompt_versions.c.token_count), 0)).where(tmpl)).scalar() or 0)
            rows = conn.execute(
                sa.select(prompt_versions.c.template, prompt_versions.c.version)
                .where(tmpl)
                .order_by(prompt_versions.c.token_count.desc(), prompt_versions.c.template, prompt_versions.c.version)
                .offset(offset)
                .limit(limit)
            ).all()
        out = []
        for key, version in rows:
            info = self.get_version(tenant, key[len(prefix) :], version)
            out.append((info, info.token_count / total if total else 0.0))
        return out, total
