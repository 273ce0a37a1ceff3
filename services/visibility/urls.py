"""URL hygiene for the crawler: one canonical spelling per page, and crawler-trap heuristics."""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from collections.abc import Iterable
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}
_TRACKING_PARAMS = frozenset(
    {
        "gclid", "gclsrc", "dclid", "fbclid", "msclkid", "yclid", "twclid", "igshid", "mc_cid", "mc_eid",
        "_ga", "_gl", "_hsenc", "_hsmi", "mkt_tok",
        "sessionid", "session_id", "phpsessid", "jsessionid", "aspsessionid", "sid", "cfid", "cftoken",
    }
)  # fmt: skip
_SESSION_PATH_PARAM = re.compile(r";(?:jsessionid|phpsessid|sessionid|sid)=[^/?#;]*", re.IGNORECASE)
_HOST_CHARS = re.compile(r"^[a-z0-9_.-]+$")
_ESCAPE = re.compile(r"%([0-9a-fA-F]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters kept as they are when re-quoting a path or query (existing escapes stay escapes).
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"

MAX_URL_LENGTH = 2000
MAX_PATH_DEPTH = 16
MAX_QUERY_PARAMS = 8
_CALENDAR_PARAMS = frozenset({"month", "date", "year", "week", "day", "calendar", "cal", "caldate", "ym"})
_SESSION_MARKERS = re.compile(
    r"(?:[;/](?:jsessionid|phpsessid|sessionid|session_id|sid)=)|(?:/\([a-z]\([a-z0-9]{8,}\)\))",
    re.IGNORECASE,
)
_YEAR = re.compile(r"^(\d{4})$")
_MONTH = re.compile(r"^(0?[1-9]|1[0-2])$")
_ISO_DATE = re.compile(r"^(\d{4})-(\d{2})(?:-(\d{2}))?$")
_EARLIEST_YEAR = 1990


def _normalize_escapes(text: str) -> str:
    """Upper-case percent escapes and decode the ones that stand for unreserved characters."""

    def fix(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else "%" + match.group(1).upper()

    return _ESCAPE.sub(fix, text)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4."""
    output: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if len(output) > 1:
                output.pop()
        elif segment != ".":
            output.append(segment)
    result = "/".join(output)
    if path.endswith(("/.", "/..")):
        result += "/"
    return result if result.startswith("/") else "/" + result


def _clean_host(host: str) -> str | None:
    host = host.lower().removesuffix(".")
    if not host:
        return None
    if ":" in host:  # IPv6 literal, validated by the caller's urlsplit
        return f"[{host}]"
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if not _HOST_CHARS.match(host) or ".." in host or host.startswith((".", "-")):
        return None
    return host


def _clean_query(query: str) -> str:
    kept: list[str] = []
    for pair in query.split("&"):
        if not pair:
            continue
        name = unquote(pair.split("=", 1)[0]).lower()
        if name.startswith("utm_") or name in _TRACKING_PARAMS:
            continue
        kept.append(_normalize_escapes(quote(pair, safe=_QUERY_SAFE)))
    return "&".join(sorted(kept))


def normalize_url(url: str, base: str | None = None) -> str | None:
    """Canonical absolute http(s) form of `url` (resolved against `base`), or None when unusable.

    Lower-cases scheme and host, drops default ports, userinfo and the fragment, removes dot segments,
    sorts the query and strips tracking and session parameters. mailto:, javascript:, data:, tel:,
    malformed URLs and hosts with invalid characters give None.
    """
    text = re.sub(r"[\t\r\n]", "", url).strip()
    if not text:
        return None
    try:
        if base is not None:
            text = urljoin(base, text)
        parts = urlsplit(text)
        port = parts.port
        hostname = parts.hostname
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not hostname:
        return None
    host = _clean_host(hostname)
    if host is None:
        return None
    netloc = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    path = _SESSION_PATH_PARAM.sub("", parts.path)
    path = _normalize_escapes(quote(_remove_dot_segments(path or "/"), safe=_PATH_SAFE))
    return urlunsplit((scheme, netloc, path, _clean_query(parts.query), ""))


def host_of(url: str) -> str:
    """Lower-case host of `url` without port ("" when it has none)."""
    try:
        return (urlsplit(url.strip()).hostname or "").removesuffix(".")
    except ValueError:
        return ""


def in_domains(url: str, domains: Iterable[str]) -> bool:
    """True when the host of `url` is one of `domains` or a subdomain of one."""
    host = host_of(url)
    if not host:
        return False
    for domain in domains:
        name = domain.strip().lower().strip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def _is_calendar(segments: list[str], params: list[tuple[str, str]]) -> bool:
    latest = dt.date.today().year + 1
    if any(name in _CALENDAR_PARAMS for name, _ in params):
        return True
    lowered = [s.lower() for s in segments]
    if any("calendar" in s for s in lowered) and (
        params or any(any(c.isdigit() for c in s) for s in lowered)
    ):
        return True
    for i, segment in enumerate(segments):
        iso = _ISO_DATE.match(segment)
        if iso and not _EARLIEST_YEAR <= int(iso.group(1)) <= latest:
            return True
        year = _YEAR.match(segment)
        followed_by_month = i + 1 < len(segments) and _MONTH.match(segments[i + 1])
        if year and followed_by_month and not _EARLIEST_YEAR <= int(year.group(1)) <= latest:
            return True
    return False


def trap_reason(url: str) -> str | None:
    """Why `url` looks like a crawler trap, or None when it looks like an ordinary page.

    One of "TOO_LONG", "TOO_MANY_PARAMS", "SESSION_ID", "CALENDAR", "REPEATED_SEGMENTS".
    Dated archive paths inside a sane year range (`/blog/2024/05/post`) pass.
    """
    if len(url) > MAX_URL_LENGTH:
        return "TOO_LONG"
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    segments = [s for s in parts.path.split("/") if s]
    if len(segments) > MAX_PATH_DEPTH:
        return "TOO_LONG"
    params = [(p.split("=", 1)[0].lower(), p.partition("=")[2]) for p in parts.query.split("&") if p]
    if len(params) > MAX_QUERY_PARAMS:
        return "TOO_MANY_PARAMS"
    session_names = {"jsessionid", "phpsessid", "sessionid", "session_id", "sid"}
    if _SESSION_MARKERS.search(parts.path) or any(name in session_names for name, _ in params):
        return "SESSION_ID"
    if _is_calendar(segments, params):
        return "CALENDAR"
    counts = Counter(s.lower() for s in segments)
    if counts and max(counts.values()) >= 3:
        return "REPEATED_SEGMENTS"
    return None
