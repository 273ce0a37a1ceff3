"""Checks of what callers send the visibility service: projects, crawl configs, runs, visits.

Every refusal is INVALID_ARGUMENT with the contract's reason and the offending field, before anything
is stored.
"""

from __future__ import annotations

import math
import re
from urllib.parse import urlsplit

from llmo.core.errors import invalid_argument
from llmo.core.limits import preview
from llmo.protos.visibility.v1 import visibility_service_pb2 as pb
from llmo.visibility import urls

HOST = re.compile(r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))+$")
ENGINE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
MAX_TEXT = 2000
MAX_QUERIES = 1000
MAX_COMPETITORS = 50
MAX_ALIASES = 50
MAX_DOMAINS = 50
MAX_ENGINES = 20
MAX_LABELS = 64
MAX_PATHS = 100
MAX_MENTION_SOURCES = 200
MAX_URL = 2048


def _text(value: str, field: str, limit: int = MAX_TEXT) -> None:
    if len(value) > limit:
        raise invalid_argument("FIELD_TOO_LONG", f"{field} is longer than {limit} characters", field=field)


def check_domain(domain: str, field: str) -> None:
    if not HOST.match(domain):
        raise invalid_argument("INVALID_DOMAIN", f"{field} must be a bare lower-case host name such as "
                               f"\"example.com\"; got {preview(domain)!r}", field=field, value=preview(domain))


def check_http_url(url: str, field: str, reason: str, limit: int = MAX_TEXT) -> None:
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and len(url) <= limit
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        ok = False
    if not ok:
        raise invalid_argument(reason, f"{field} must be an http(s) URL; got {preview(url)!r}", field=field,
                               value=preview(url))


def check_project(project: pb.Project) -> None:
    if not project.brand.name.strip():
        raise invalid_argument("MISSING_BRAND", "project.brand.name is required", field="project.brand.name")
    if not project.domains:
        raise invalid_argument("NO_DOMAINS", "name at least one of the brand's domains", field="project.domains")
    if len(project.domains) > MAX_DOMAINS:
        raise invalid_argument("NO_DOMAINS", f"at most {MAX_DOMAINS} domains", field="project.domains")
    for i, domain in enumerate(project.domains):
        check_domain(domain, f"project.domains[{i}]")
    _text(project.display_name, "project.display_name", 256)
    _text(project.brand.name, "project.brand.name", 256)
    _text(project.brand.description, "project.brand.description", 5000)
    _text(project.brand.logo_url, "project.brand.logo_url")
    for name, values in (("project.brand.aliases", project.brand.aliases),
                         ("project.brand.same_as", project.brand.same_as)):
        if len(values) > MAX_ALIASES:
            raise invalid_argument("FIELD_TOO_LONG", f"{name}: at most {MAX_ALIASES}", field=name)
        for value in values:
            _text(value, name, 256 if name.endswith("aliases") else MAX_TEXT)
    if len(project.brand.facts) > MAX_LABELS:
        raise invalid_argument("FIELD_TOO_LONG", f"project.brand.facts: at most {MAX_LABELS}", field="project.brand.facts")
    for key, value in project.brand.facts.items():
        _text(key, "project.brand.facts", 128)
        _text(value, "project.brand.facts", 1000)
    if len(project.competitors) > MAX_COMPETITORS:
        raise invalid_argument("FIELD_TOO_LONG", f"at most {MAX_COMPETITORS} competitors", field="project.competitors")
    for i, competitor in enumerate(project.competitors):
        field = f"project.competitors[{i}]"
        if not competitor.name.strip():
            raise invalid_argument("MISSING_BRAND", f"{field}.name is required", field=f"{field}.name")
        _text(competitor.name, f"{field}.name", 256)
        if len(competitor.aliases) > MAX_ALIASES or len(competitor.domains) > MAX_DOMAINS:
            raise invalid_argument("FIELD_TOO_LONG", f"{field}: too many aliases or domains", field=field)
        for alias in competitor.aliases:
            _text(alias, f"{field}.aliases", 256)
        for j, domain in enumerate(competitor.domains):
            check_domain(domain, f"{field}.domains[{j}]")
    queries = list(project.tracked_queries) + [q.text for q in project.queries]
    if len(queries) > MAX_QUERIES:
        raise invalid_argument("TOO_MANY_QUERIES", f"at most {MAX_QUERIES} tracked queries", field="project.queries")
    for i, query in enumerate(project.queries):
        field = f"project.queries[{i}]"
        if not query.text.strip():
            raise invalid_argument("EMPTY_QUERY", f"{field}.text is empty", field=f"{field}.text")
        _text(query.text, f"{field}.text")
        _text(query.topic, f"{field}.topic", 256)
        if not (math.isfinite(query.weight) and query.weight >= 0):
            raise invalid_argument("INVALID_WEIGHT", f"{field}.weight must be a finite number >= 0",
                                   field=f"{field}.weight")
    for i, text in enumerate(project.tracked_queries):
        if not text.strip():
            raise invalid_argument("EMPTY_QUERY", f"project.tracked_queries[{i}] is empty",
                                   field=f"project.tracked_queries[{i}]")
        _text(text, f"project.tracked_queries[{i}]")
    if len(project.engines) > MAX_ENGINES:
        raise invalid_argument("FIELD_TOO_LONG", f"at most {MAX_ENGINES} engines", field="project.engines")
    names = set()
    for i, engine in enumerate(project.engines):
        field = f"project.engines[{i}]"
        if not ENGINE_NAME.match(engine.name) or engine.name in names:
            raise invalid_argument("INVALID_ENGINE", f"{field}.name must match [a-z0-9][a-z0-9._-]{{0,62}} and be "
                                   f"unique; got {preview(engine.name)!r}", field=f"{field}.name")
        names.add(engine.name)
        _text(engine.model, f"{field}.model", 256)
        _text(engine.api_key_env, f"{field}.api_key_env", 128)
        if engine.base_url:
            check_http_url(engine.base_url, f"{field}.base_url", "INVALID_ENGINE")
        if engine.surface not in pb.Surface.values():
            raise invalid_argument("INVALID_ENGINE", f"{field}.surface is not a Surface", field=f"{field}.surface")
    if len(project.default_engines) > MAX_ENGINES:
        raise invalid_argument("FIELD_TOO_LONG", f"at most {MAX_ENGINES} default engines", field="project.default_engines")
    for i, name in enumerate(project.default_engines):
        _text(name, f"project.default_engines[{i}]", 256)
    if len(project.labels) > MAX_LABELS:
        raise invalid_argument("FIELD_TOO_LONG", f"at most {MAX_LABELS} labels", field="project.labels")
    for key, value in project.labels.items():
        _text(key, "project.labels", 63)
        _text(value, "project.labels", 256)
    check_mention_sources(project)
    check_crawl_config(project.crawl_config, "project.crawl_config")


def check_mention_sources(project: pb.Project) -> None:
    """At most 200 absolute http(s) URLs of at most 2048 characters, none within the project's domains."""
    if len(project.mention_sources) > MAX_MENTION_SOURCES:
        raise invalid_argument("INVALID_MENTION_SOURCE", f"at most {MAX_MENTION_SOURCES} mention sources",
                               field="project.mention_sources")
    for i, source in enumerate(project.mention_sources):
        field = f"project.mention_sources[{i}]"
        check_http_url(source, field, "INVALID_MENTION_SOURCE", MAX_URL)
        normal = urls.normalize_url(source)
        if normal is None:
            raise invalid_argument("INVALID_MENTION_SOURCE", f"{field} is not a URL the crawler can fetch; got "
                                   f"{preview(source)!r}", field=field, value=preview(source))
        if urls.in_domains(normal, project.domains):
            raise invalid_argument("INVALID_MENTION_SOURCE", f"{field} is within the project's own domains; "
                                   "mention sources are pages on other sites", field=field, value=preview(source))


def check_crawl_config(config: pb.CrawlConfig, field: str) -> None:
    def bad(message: str) -> None:
        raise invalid_argument("INVALID_CRAWL_CONFIG", f"{field}: {message}", field=field)

    if not 0 <= config.max_pages <= 10_000:
        bad("max_pages must be within 1..10000 (0 means 500)")
    if not 0 <= config.max_depth <= 50:
        bad("max_depth must be within 1..50 (0 means 5)")
    rps = config.requests_per_second
    if not (math.isfinite(rps) and 0 <= rps <= 10):
        bad("requests_per_second must be within (0, 10] (0 means 1)")
    if not 0 <= config.concurrency <= 16:
        bad("concurrency must be within 1..16 (0 means 1)")
    if len(config.include_paths) > MAX_PATHS or len(config.exclude_paths) > MAX_PATHS:
        bad(f"at most {MAX_PATHS} include and exclude paths")
    for path in list(config.include_paths) + list(config.exclude_paths):
        if not path.startswith("/") or len(path) > 500:
            bad(f"paths must start with '/' (and be at most 500 characters); got {preview(path)!r}")
    if len(config.user_agent) > 256 or any(ord(c) < 32 for c in config.user_agent):
        bad("user_agent must be at most 256 printable characters")
