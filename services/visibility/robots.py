"""robots.txt per RFC 9309: fetched once per origin, parsed with protego, cached with a TTL."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from protego import Protego

from llmo.core.logging import get_logger
from llmo.visibility.fetcher import Fetcher, FetchResult

log = get_logger(__name__)

AI_CRAWLERS = (
    "GPTBot",
    "OAI-SearchBot",
    "ChatGPT-User",
    "ClaudeBot",
    "Claude-User",
    "Claude-SearchBot",
    "PerplexityBot",
    "Perplexity-User",
    "Google-Extended",
    "CCBot",
    "Bytespider",
    "Applebot-Extended",
)
# The crawlers that fetch pages to answer or cite them (search indexes and user-triggered fetches).
# Blocking these keeps a page out of answers; blocking the training crawlers above does not.
ANSWER_CRAWLERS = ("OAI-SearchBot", "ChatGPT-User", "Claude-SearchBot", "Claude-User", "PerplexityBot",
                   "Perplexity-User")
# RFC 9309 section 2.5: crawlers must parse at least the first 500 KiB.
MAX_ROBOTS_BYTES = 500 * 1024
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_COMPATIBLE = re.compile(r"compatible;\s*([A-Za-z0-9_-]+)", re.IGNORECASE)


def product_token(user_agent: str) -> str:
    """The product token robots.txt groups match: `LLMOBot/1.0 (+url)` -> `LLMOBot`.

    Browser-style strings (`Mozilla/5.0 (compatible; GPTBot/1.1)`) give the compatible token.
    """
    compatible = _COMPATIBLE.search(user_agent)
    if compatible:
        return compatible.group(1)
    match = _TOKEN.search(user_agent)
    return match.group(0) if match else "*"


def origin_of(url: str) -> str:
    """`scheme://host[:port]` of `url`, lower-case, default ports dropped."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is None or (scheme, port) in (("http", 80), ("https", 443)):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


@dataclass
class RobotsRules:
    """The robots.txt rules of one origin.

    status: "parsed" (2xx), "missing" (4xx: everything allowed) or "unreachable" (5xx, network error,
    refused address: everything disallowed).
    """

    origin: str
    status: str
    parser: Protego | None = field(default=None, repr=False)
    fetched_status: int = 0

    def allowed(self, url: str, user_agent: str) -> bool:
        """May `user_agent` fetch `url`? /robots.txt itself is always allowed."""
        if urlsplit(url).path == "/robots.txt":
            return True
        if self.status == "missing":
            return True
        if self.status != "parsed" or self.parser is None:
            return False
        try:
            return bool(self.parser.can_fetch(url, product_token(user_agent)))
        except Exception:  # protego on hostile input: fail closed, never raise into the crawler
            log.warning("robots_match_failed", origin=self.origin, url=url)
            return False

    def crawl_delay(self, user_agent: str) -> float | None:
        """Seconds between requests the site asks `user_agent` to wait, if it says."""
        if self.parser is None:
            return None
        try:
            delay = self.parser.crawl_delay(product_token(user_agent))
        except Exception:
            return None
        return float(delay) if delay is not None and delay >= 0 else None

    def sitemaps(self) -> list[str]:
        """Absolute sitemap URLs named by `Sitemap:` lines, in order, without duplicates."""
        if self.parser is None:
            return []
        found: list[str] = []
        for entry in self.parser.sitemaps:
            url = urljoin(self.origin + "/", str(entry).strip())
            if url.startswith(("http://", "https://")) and url not in found:
                found.append(url)
        return found

    def ai_bots_blocked(self, agents: Iterable[str] = AI_CRAWLERS) -> list[str]:
        """The AI crawler user agents that may not fetch `/` of this origin."""
        return [agent for agent in agents if not self.allowed(self.origin + "/", agent)]

    def answer_crawlers_blocked(self, url: str) -> list[str]:
        """The answer-engine crawlers (`ANSWER_CRAWLERS`) that may not fetch `url`."""
        return [agent for agent in ANSWER_CRAWLERS if not self.allowed(url, agent)]


def parse_robots(origin: str, body: bytes) -> RobotsRules:
    """Parse a robots.txt body (truncated to 500 KiB, invalid UTF-8 replaced); never raises."""
    text = body[:MAX_ROBOTS_BYTES].decode("utf-8", errors="replace").lstrip("\ufeff")
    try:
        parser = Protego.parse(text)
    except Exception:
        log.warning("robots_unparseable", origin=origin)
        parser = Protego.parse("")
    return RobotsRules(origin=origin, status="parsed", parser=parser)


def rules_from_fetch(origin: str, result: FetchResult) -> RobotsRules:
    """RobotsRules for one fetch of /robots.txt, by RFC 9309 status handling."""
    if result.error_reason in ("TOO_MANY_REDIRECTS", "REDIRECT_LOOP"):
        # RFC 9309 2.3.1.2: past five redirects the file may be taken as unavailable.
        return RobotsRules(origin=origin, status="missing", fetched_status=result.status)
    if result.error_reason is None and 200 <= result.status < 300:
        rules = parse_robots(origin, result.body)
        rules.fetched_status = result.status
        return rules
    # 429 is a request to slow down, not a statement about the rules: treated like 5xx.
    if result.error_reason == "HTTP_ERROR" and 400 <= result.status < 500 and result.status != 429:
        return RobotsRules(origin=origin, status="missing", fetched_status=result.status)
    log.info("robots_unreachable", origin=origin, status=result.status, reason=result.error_reason)
    return RobotsRules(origin=origin, status="unreachable", fetched_status=result.status)


class RobotsCache:
    """robots.txt rules per origin, fetched at most once per TTL; concurrent callers share a fetch.

    Unreachable results are kept for `error_ttl_s` only, so a passing outage does not block a site
    for a day.
    """

    def __init__(
        self,
        fetcher: Fetcher,
        *,
        ttl_s: float = 86400.0,
        clock: Callable[[], float] = time.monotonic,
        error_ttl_s: float = 300.0,
    ) -> None:
        self._fetcher = fetcher
        self._ttl_s = ttl_s
        self._error_ttl_s = min(error_ttl_s, ttl_s)
        self._clock = clock
        self._cache: dict[str, tuple[float, RobotsRules]] = {}
        self._pending: dict[str, asyncio.Task[RobotsRules]] = {}

    async def rules(self, url: str) -> RobotsRules:
        """The rules governing `url`'s origin."""
        origin = origin_of(url)
        cached = self._cache.get(origin)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        task = self._pending.get(origin)
        if task is None:
            # A task of its own, so a caller giving up does not cancel the fetch the others wait on.
            task = asyncio.create_task(self._load(origin))
            self._pending[origin] = task
            task.add_done_callback(lambda _: self._pending.pop(origin, None))
        return await asyncio.shield(task)

    async def _load(self, origin: str) -> RobotsRules:
        result = await self._fetcher.fetch(
            origin + "/robots.txt", accept=(), max_bytes=MAX_ROBOTS_BYTES, truncate=True
        )
        if result.error_reason is None and 200 <= result.status < 300:
            rules = await asyncio.to_thread(rules_from_fetch, origin, result)
        else:
            rules = rules_from_fetch(origin, result)
        ttl = self._error_ttl_s if rules.status == "unreachable" else self._ttl_s
        self._cache[origin] = (self._clock() + ttl, rules)
        return rules
