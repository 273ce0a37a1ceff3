"""AI referral traffic and AI crawler fetches, from web server logs or GA4 exports.

A visit is AI-referred when its Referer host (or, failing that, its `utm_source`) belongs to an answer
engine. Counts are a lower bound, see `LOWER_BOUND_NOTE`. Requests whose user agent names an AI crawler
are fetches, not visits: they are counted apart, by token and operator, and are unverified, see
`CRAWLER_NOTE`.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import parse_qs, urlsplit

from llmo.core.logging import get_logger

log = get_logger(__name__)

LOWER_BOUND_NOTE = (
    "AI referral counts are a lower bound: mobile and desktop apps of answer engines, and many engines' "
    "web interfaces, send no Referer (or strip it), so those visits arrive unlabelled and look like direct "
    "traffic. Only visits whose referrer or utm_source names an engine are counted."
)
CRAWLER_NOTE = (
    "Crawler fetches are matched on the user-agent string only, which anyone can send; they are unverified. "
    "Verify with a reverse-then-forward DNS lookup or the operator's published IP ranges before relying on them."
)

AI_REFERRERS: dict[str, str] = {
    "chatgpt.com": "chatgpt",
    "chat.openai.com": "chatgpt",
    "perplexity.ai": "perplexity",
    "gemini.google.com": "gemini",
    "bard.google.com": "gemini",
    "copilot.microsoft.com": "copilot",
    "claude.ai": "claude",
    "you.com": "you",
    "phind.com": "phind",
    "poe.com": "poe",
    "chat.deepseek.com": "deepseek",
    "meta.ai": "meta_ai",
    "grok.com": "grok",
    "chat.mistral.ai": "mistral",
}
# Android apps send `android-app://<package>/` as the Referer
AI_APP_REFERRERS: dict[str, str] = {
    "com.openai.chatgpt": "chatgpt",
    "ai.perplexity.app.android": "perplexity",
    "com.google.android.apps.bard": "gemini",
    "com.microsoft.copilot": "copilot",
    "com.anthropic.claude": "claude",
}
# engines that live under a path of a general-purpose host
AI_REFERRER_PATHS: dict[tuple[str, str], str] = {
    ("bing.com", "/chat"): "copilot",
    ("x.com", "/i/grok"): "grok",
}
AI_UTM_SOURCES: dict[str, str] = {
    **AI_REFERRERS,
    "chatgpt": "chatgpt",
    "openai": "chatgpt",
    "perplexity": "perplexity",
    "gemini": "gemini",
    "bard": "gemini",
    "copilot": "copilot",
    "bing_chat": "copilot",
    "claude": "claude",
    "anthropic": "claude",
    "phind": "phind",
    "poe": "poe",
    "deepseek": "deepseek",
    "meta_ai": "meta_ai",
    "grok": "grok",
    "mistral": "mistral",
}

# robots.txt-only tokens (Google-Extended, Applebot-Extended) never appear in a user agent, and Googlebot,
# bingbot etc. are search crawlers, so none of them are here.
AI_CRAWLERS: dict[str, tuple[str, str]] = {
    "GPTBot": ("openai", "training"),
    "OAI-SearchBot": ("openai", "search"),
    "ChatGPT-User": ("openai", "user_fetch"),
    "ClaudeBot": ("anthropic", "training"),
    "Claude-User": ("anthropic", "user_fetch"),
    "Claude-SearchBot": ("anthropic", "search"),
    "anthropic-ai": ("anthropic", "training"),
    "PerplexityBot": ("perplexity", "search"),
    "Perplexity-User": ("perplexity", "user_fetch"),
    "CCBot": ("common_crawl", "training"),
    "Bytespider": ("bytedance", "training"),
    "Amazonbot": ("amazon", "training"),
    "meta-externalagent": ("meta", "training"),
    "meta-externalfetcher": ("meta", "user_fetch"),
    "DuckAssistBot": ("duckduckgo", "search"),
    "MistralAI-User": ("mistral", "user_fetch"),
    "cohere-ai": ("cohere", "user_fetch"),
}
_CRAWLER_RE = re.compile(
    r"(?<![\w-])("
    + "|".join(re.escape(t) for t in sorted(AI_CRAWLERS, key=len, reverse=True))
    + r")(?![\w-])",
    re.IGNORECASE,
)
_CRAWLER_BY_LOWER = {t.lower(): t for t in AI_CRAWLERS}
# other automated clients (search crawlers, SEO tools, scripts): neither visits nor AI fetches
_OTHER_BOT_RE = re.compile(
    r"[a-z]*(?:bot|spider|crawler)[\w.-]*/|\b(?:curl|wget|python-requests|python-urllib|go-http-client|headlesschrome)\b",
    re.IGNORECASE,
)
_STATIC = re.compile(
    r"\.(?:css|js|mjs|map|png|jpe?g|gif|svg|ico|webp|avif|woff2?|ttf|otf|eot|mp4|webm|mp3)$", re.IGNORECASE
)
BUCKETS = ("hour", "day", "week", "month")


@dataclass(frozen=True)
class CrawlerMatch:
    """An AI crawler named by a user agent. `verified` is always False here: checking needs reverse DNS
    or the operator's published IP ranges, which a caller may do with `Visit.client_ip`."""

    token: str
    operator: str
    purpose: str  # training | search | user_fetch
    verified: bool = False


@dataclass
class Visit:
    """One request (log) or one aggregated row (GA4, where `count` is the row's sessions)."""

    time: datetime  # UTC
    landing_url: str
    referrer: str
    user_agent: str
    utm_source: str
    status: int | None = None
    client_ip: str = ""
    count: int = 1


def _host(value: str) -> tuple[str, str]:
    """(host without www., path) of a URL or bare host; ("", "") when it has none."""
    value = value.strip()
    if not value or value in ("-", "(direct)", "(not set)", "(none)"):
        return "", ""
    if "://" not in value:
        value = "//" + value
    try:
        parts = urlsplit(value)
        host = (parts.hostname or "").rstrip(".")
    except ValueError:
        return "", ""
    return (host[4:] if host.startswith("www.") else host), parts.path


def _lookup_host(host: str, path: str) -> str | None:
    for (base, prefix), engine in AI_REFERRER_PATHS.items():
        if (host == base or host.endswith("." + base)) and (path == prefix or path.startswith(prefix + "/")):
            return engine
    probe = host
    while probe:
        if probe in AI_REFERRERS:
            return AI_REFERRERS[probe]
        probe = probe.partition(".")[2]
    return None


def classify_referral(referrer: str, utm_source: str = "") -> str | None:
    """Engine that referred a visit, from the Referer (host, its subdomains, or a known path), else from
    `utm_source` (e.g. ChatGPT's `utm_source=chatgpt.com`); None when neither names an engine."""
    if referrer.strip().lower().startswith("android-app://"):
        package = referrer.strip()[len("android-app://") :].split("/")[0].lower()
        if package in AI_APP_REFERRERS:
            return AI_APP_REFERRERS[package]
    host, path = _host(referrer)
    if host:
        engine = _lookup_host(host, path)
        if engine:
            return engine
    source = utm_source.strip().lower()
    if not source:
        return None
    if source in AI_UTM_SOURCES:
        return AI_UTM_SOURCES[source]
    host, path = _host(source)
    return _lookup_host(host, path) if "." in host else None


def classify_crawler(user_agent: str) -> CrawlerMatch | None:
    """The AI crawler a user agent names (token matched case-insensitively as a whole word), or None."""
    m = _CRAWLER_RE.search(user_agent or "")
    if not m:
        return None
    token = _CRAWLER_BY_LOWER[m.group(1).lower()]
    operator, purpose = AI_CRAWLERS[token]
    return CrawlerMatch(token, operator, purpose)


# ---------------------------------------------------------------- combined log format

_QUOTED = r'"((?:[^"\\]|\\.)*)"'
_LOG_LINE = re.compile(
    r"^(\S+) \S+ \S+ \[([^\]]+)\] "
    + _QUOTED
    + r" (\d{3}|-) (?:\d+|-)(?: "
    + _QUOTED
    + r" "
    + _QUOTED
    + r")?(?:\s.*)?$"
)
_MONTHS = {m: i for i, m in enumerate(("jan feb mar apr may jun jul aug sep oct nov dec").split(), 1)}
_LOG_TIME = re.compile(r"^(\d{2})/([A-Za-z]{3})/(\d{4}):(\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})$")
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|.)")


def _unescape(value: str) -> str:
    """Undo Apache (`\\"`) and nginx (`\\x22`) escaping inside a quoted log field."""

    def repl(m: re.Match[str]) -> str:
        code = m.group(1)
        if code.startswith("x") and len(code) == 3:
            return chr(int(code[1:], 16))
        return {"n": "\n", "t": "\t"}.get(code, code)

    return _ESCAPE.sub(repl, value)


def _log_time(value: str) -> datetime | None:
    m = _LOG_TIME.match(value)
    if not m or m.group(2).lower() not in _MONTHS:
        return None
    day, _, year, hour, minute, second, sign, off_h, off_m = m.groups()
    try:
        offset = timedelta(hours=int(off_h), minutes=int(off_m)) * (1 if sign == "+" else -1)
        local = datetime(
            int(year),
            _MONTHS[m.group(2).lower()],
            int(day),
            int(hour),
            int(minute),
            int(second),
            tzinfo=timezone(offset),
        )
    except ValueError:
        return None
    return local.astimezone(UTC)


def _utm_source(query: str) -> str:
    values = parse_qs(query).get("utm_source")
    return values[0] if values else ""


def parse_combined_log(lines: Iterable[str], *, site: str) -> Iterator[tuple[int, Visit | None, str | None]]:
    """Parse Apache/nginx combined (or common) log lines into visits.

    Yields (line_number, visit, None) or (line_number, None, reason) with reason one of MALFORMED_LINE,
    BAD_TIMESTAMP, BAD_REQUEST_LINE; never raises on bad input. Blank lines are skipped. `site`
    (scheme and host, e.g. "https://example.com") turns request paths into landing URLs.
    """
    base = site.rstrip("/")
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        m = _LOG_LINE.match(line)
        if not m:
            yield number, None, "MALFORMED_LINE"
            continue
        client, stamp, request, status, referrer, agent = m.groups()
        when = _log_time(stamp)
        if when is None:
            yield number, None, "BAD_TIMESTAMP"
            continue
        parts = _unescape(request).split()
        if len(parts) not in (2, 3) or not (parts[1].startswith("/") or "://" in parts[1]):
            yield number, None, "BAD_REQUEST_LINE"
            continue
        target = parts[1]
        landing = target if "://" in target else base + target
        referrer = "" if referrer in (None, "-") else _unescape(referrer)
        agent = "" if agent in (None, "-") else _unescape(agent)
        yield (
            number,
            Visit(
                time=when,
                landing_url=landing,
                referrer=referrer,
                user_agent=agent,
                utm_source=_utm_source(urlsplit(target).query),
                status=None if status == "-" else int(status),
                client_ip=client,
            ),
            None,
        )


# ---------------------------------------------------------------- GA4 CSV exports

_GA4_COLUMNS: dict[str, str] = {
    "session source": "source",
    "first user source": "source",
    "source": "source",
    "session source / medium": "source_medium",
    "first user source / medium": "source_medium",
    "source / medium": "source_medium",
    "page referrer": "referrer",
    "landing page + query string": "landing",
    "landing page": "landing",
    "page path + query string": "landing",
    "page path and screen class": "landing",
    "date": "date",
    "date + hour (yyyymmddhh)": "date",
    "date hour": "date",
    "sessions": "count",
}
_GA4_TRAFFIC = {"source", "source_medium", "referrer", "landing"}
_START_DATE = re.compile(r"^#\s*start date:\s*(\d{8})", re.IGNORECASE)


def _ga4_time(value: str) -> datetime | None:
    digits = value.strip().replace("-", "")
    try:
        if len(digits) == 8:
            return datetime.strptime(digits, "%Y%m%d").replace(tzinfo=UTC)
        if len(digits) == 10:
            return datetime.strptime(digits, "%Y%m%d%H").replace(tzinfo=UTC)
    except ValueError:
        return None
    return None


def _ga4_count(value: str) -> int | None:
    cleaned = re.sub(r"[,\s_'\u00a0\u202f]", "", value)
    try:
        number = float(cleaned)
    except ValueError:
        return None
    if number < 0 or number != int(number):
        return None
    return int(number)


def _cell(value: str) -> str:
    value = value.strip()
    return "" if value in ("(not set)", "(none)", "(direct)") else value


def parse_ga4_csv(text: str) -> Iterator[tuple[int, Visit | None, str | None]]:
    """Parse a GA4 report or exploration CSV export into visits (one per row, `count` = Sessions).

    Leading `#` comment lines are skipped (their "Start date" is the time of rows when the table has no
    date column); the first row naming a known column is the header. Dates are in the property's time zone
    and are stored as UTC. Errors: (0, None, "UNRECOGNISED_COLUMNS") once when no header is found, and per
    row MALFORMED_ROW, BAD_DATE, BAD_COUNT. A "Grand total" row is skipped.
    """
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    columns: dict[str, int] | None = None
    start_date: datetime | None = None
    width = 0
    for row in reader:
        number = reader.line_num
        if not row or not any(cell.strip() for cell in row):
            continue
        first = row[0].strip()
        if first.startswith("#"):
            m = _START_DATE.match(first)
            if m:
                start_date = _ga4_time(m.group(1))
            continue
        names = [cell.strip().lower() for cell in row]
        known = {_GA4_COLUMNS[n]: i for i, n in reversed(list(enumerate(names))) if n in _GA4_COLUMNS}
        if known.keys() & _GA4_TRAFFIC and not any(
            _ga4_count(cell) is not None for cell in row if cell.strip()
        ):
            columns, width = known, len(row)
            continue
        if columns is None:
            continue
        if first.lower() in ("grand total", "total", "totals"):
            continue
        if len(row) != width:
            yield number, None, "MALFORMED_ROW"
            continue
        visit_or_error = _ga4_visit(row, columns, start_date)
        if isinstance(visit_or_error, str):
            yield number, None, visit_or_error
        else:
            yield number, visit_or_error, None
    if columns is None:
        yield 0, None, "UNRECOGNISED_COLUMNS"


def _ga4_visit(row: list[str], columns: dict[str, int], start_date: datetime | None) -> Visit | str:
    if "date" in columns:
        when = _ga4_time(row[columns["date"]])
        if when is None:
            return "BAD_DATE"
    elif start_date is not None:
        when = start_date
    else:
        return "BAD_DATE"
    count = 1
    if "count" in columns:
        parsed = _ga4_count(row[columns["count"]])
        if parsed is None:
            return "BAD_COUNT"
        count = parsed
    source = _cell(row[columns["source"]]) if "source" in columns else ""
    if not source and "source_medium" in columns:
        source = _cell(row[columns["source_medium"]].split(" / ")[0])
    return Visit(
        time=when,
        landing_url=_cell(row[columns["landing"]]) if "landing" in columns else "",
        referrer=_cell(row[columns["referrer"]]) if "referrer" in columns else "",
        user_agent="",
        utm_source=source,
        count=count,
    )


# ---------------------------------------------------------------- summary


@dataclass
class LandingPage:
    url: str
    total: int
    by_engine: dict[str, int]


@dataclass
class ReferralSummary:
    """AI referrals and AI crawler fetches. Referral counts are a lower bound (`note`); crawler counts are
    unverified user-agent matches (`crawler_note`)."""

    bucket: str
    visits: int  # human visits (internal navigation, static assets and bots excluded)
    ai_visits: int
    ai_share: float
    by_engine: dict[str, int]
    by_bucket: dict[str, dict[str, int]]  # bucket -> engine -> visits
    top_landing_pages: list[LandingPage]
    ai_error_landings: dict[str, int]  # engine -> AI-referred visits answered with status >= 400
    crawler_by_token: dict[str, int]
    crawler_by_operator: dict[str, int]
    crawler_by_bucket: dict[str, dict[str, int]]  # bucket -> token -> fetches
    other_bot_requests: int
    crawlers_verified: bool = False
    note: str = LOWER_BOUND_NOTE
    crawler_note: str = CRAWLER_NOTE
    by_purpose: dict[str, int] = field(default_factory=dict)


def bucket_key(when: datetime, bucket: str) -> str:
    """Bucket label of a time (in UTC): hour "2024-05-01T13", day "2024-05-01", week "2024-W18",
    month "2024-05"."""
    when = when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    if bucket == "hour":
        return when.strftime("%Y-%m-%dT%H")
    if bucket == "day":
        return when.strftime("%Y-%m-%d")
    if bucket == "week":
        year, week, _ = when.isocalendar()
        return f"{year}-W{week:02d}"
    if bucket == "month":
        return when.strftime("%Y-%m")
    raise ValueError(f"bucket must be one of {', '.join(BUCKETS)}")


def _page_key(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme:
        return f"{parts.scheme}://{parts.netloc}{parts.path or '/'}"
    return parts.path or url


def _internal(visit: Visit) -> bool:
    landing_host, _ = _host(visit.landing_url) if "://" in visit.landing_url else ("", "")
    referrer_host, _ = _host(visit.referrer) if "://" in visit.referrer else ("", "")
    return bool(landing_host) and landing_host == referrer_host


def summarize(visits: Iterable[Visit], *, bucket: str = "day", top: int = 20) -> ReferralSummary:
    """Count AI-referred visits per engine and bucket, top AI landing pages, and AI crawler fetches.

    Human visits exclude requests for static assets, navigation within the site (Referer on the landing
    host) and automated clients; `Visit.count` is honoured. Referral counts are a lower bound
    (`LOWER_BOUND_NOTE`); crawler fetches are unverified (`CRAWLER_NOTE`).
    """
    if bucket not in BUCKETS:
        raise ValueError(f"bucket must be one of {', '.join(BUCKETS)}")
    total = 0
    by_engine: Counter[str] = Counter()
    by_bucket: dict[str, Counter[str]] = defaultdict(Counter)
    pages: dict[str, Counter[str]] = defaultdict(Counter)
    errors: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    operators: Counter[str] = Counter()
    purposes: Counter[str] = Counter()
    crawl_buckets: dict[str, Counter[str]] = defaultdict(Counter)
    other_bots = 0
    for visit in visits:
        key = bucket_key(visit.time, bucket)
        crawler = classify_crawler(visit.user_agent)
        if crawler is not None:
            tokens[crawler.token] += visit.count
            operators[crawler.operator] += visit.count
            purposes[crawler.purpose] += visit.count
            crawl_buckets[key][crawler.token] += visit.count
            continue
        if visit.user_agent and _OTHER_BOT_RE.search(visit.user_agent):
            other_bots += visit.count
            continue
        if _STATIC.search(urlsplit(visit.landing_url).path) or _internal(visit):
            continue
        total += visit.count
        engine = classify_referral(visit.referrer, visit.utm_source)
        if engine is None:
            continue
        by_engine[engine] += visit.count
        by_bucket[key][engine] += visit.count
        pages[_page_key(visit.landing_url)][engine] += visit.count
        if visit.status is not None and visit.status >= 400:
            errors[engine] += visit.count
    ai = sum(by_engine.values())
    ranked = sorted(pages.items(), key=lambda item: (-sum(item[1].values()), item[0]))[:top]
    return ReferralSummary(
        bucket=bucket,
        visits=total,
        ai_visits=ai,
        ai_share=ai / total if total else 0.0,
        by_engine=dict(by_engine.most_common()),
        by_bucket={k: dict(v) for k, v in sorted(by_bucket.items())},
        top_landing_pages=[LandingPage(url, sum(c.values()), dict(c.most_common())) for url, c in ranked],
        ai_error_landings=dict(errors),
        crawler_by_token=dict(tokens.most_common()),
        crawler_by_operator=dict(operators.most_common()),
        crawler_by_bucket={k: dict(v) for k, v in sorted(crawl_buckets.items())},
        other_bot_requests=other_bots,
        by_purpose=dict(purposes),
    )
