"""robots.txt: RFC 9309 status handling, rules, AI crawler report, caching, hostile files."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from llmo.visibility.fetcher import Fetcher, FetchResult
from llmo.visibility.netguard import AddressPolicy
from llmo.visibility.robots import (
    AI_CRAWLERS,
    MAX_ROBOTS_BYTES,
    RobotsCache,
    origin_of,
    parse_robots,
    product_token,
    rules_from_fetch,
)
from tests.unit.visibility.site import make_site, serve_site

UA = "LLMOBot/1.0 (+https://llmo.example/bot)"


@pytest.fixture
async def site() -> AsyncIterator[tuple[web.Application, str]]:
    app = make_site(pages=5)
    async with serve_site(app) as base:
        yield app, base


@pytest.fixture
async def fetcher() -> AsyncIterator[Fetcher]:
    async with Fetcher(user_agent=UA, policy=AddressPolicy(["127.0.0.1"])) as f:
        yield f


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_site_robots_are_parsed(site: tuple[web.Application, str], fetcher: Fetcher) -> None:
    _, base = site
    rules = await RobotsCache(fetcher).rules(base + "/articles/1")
    assert rules.status == "parsed"
    assert rules.origin == base
    assert rules.allowed(base + "/articles/1", UA)
    assert not rules.allowed(base + "/private/secret", UA)
    assert not rules.allowed(base + "/articles/1", "GPTBot")
    assert not rules.allowed(base + "/", "Mozilla/5.0 (compatible; GPTBot/1.1; +https://openai.com/gptbot)")
    assert rules.allowed(base + "/robots.txt", "GPTBot")
    assert rules.crawl_delay(UA) == 1.0
    assert rules.sitemaps() == [base + "/sitemap_index.xml"]
    assert rules.ai_bots_blocked() == ["GPTBot"]


@pytest.mark.parametrize(("status", "expected"), [(404, "missing"), (410, "missing"), (403, "missing")])
async def test_4xx_allows_everything(
    site: tuple[web.Application, str], fetcher: Fetcher, status: int, expected: str
) -> None:
    app, base = site
    app["config"].robots_status = status
    rules = await RobotsCache(fetcher).rules(base + "/")
    assert rules.status == expected
    assert rules.allowed(base + "/private/secret", "GPTBot")
    assert rules.ai_bots_blocked() == []
    assert rules.crawl_delay(UA) is None


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_5xx_disallows_everything(
    site: tuple[web.Application, str], fetcher: Fetcher, status: int
) -> None:
    app, base = site
    app["config"].robots_status = status
    rules = await RobotsCache(fetcher).rules(base + "/")
    assert rules.status == "unreachable"
    assert not rules.allowed(base + "/articles/1", UA)
    assert rules.ai_bots_blocked() == list(AI_CRAWLERS)


async def test_ssrf_refused_origin_is_unreachable(site: tuple[web.Application, str]) -> None:
    app, base = site
    async with Fetcher(user_agent=UA) as strict:
        rules = await RobotsCache(strict).rules(base + "/")
    assert rules.status == "unreachable"
    assert app["hits"]["/robots.txt"] == 0


async def test_network_error_is_unreachable(fetcher: Fetcher) -> None:
    rules = await RobotsCache(fetcher).rules("http://127.0.0.1:1/")
    assert rules.status == "unreachable"
    assert not rules.allowed("http://127.0.0.1:1/x", UA)


async def test_redirected_robots_are_followed(site: tuple[web.Application, str], fetcher: Fetcher) -> None:
    app, base = site

    async def moved(request: web.Request) -> web.Response:
        return web.Response(text="User-agent: *\nDisallow: /\n")

    # A second app on another port stands in for the redirect target's content.
    other = web.Application()
    other.router.add_get("/robots.txt", moved)
    async with serve_site(other) as other_base:
        app["config"].robots_redirect = other_base + "/robots.txt"
        rules = await RobotsCache(fetcher).rules(base + "/")
    assert rules.status == "parsed"
    assert not rules.allowed(base + "/articles/1", UA)


def test_redirect_loops_mean_missing() -> None:
    result = FetchResult(url="u", final_url="u", status=302, error_reason="TOO_MANY_REDIRECTS")
    assert rules_from_fetch("http://example.com", result).status == "missing"


async def test_cache_fetches_once_per_origin_within_ttl(
    site: tuple[web.Application, str], fetcher: Fetcher
) -> None:
    app, base = site
    clock = Clock()
    cache = RobotsCache(fetcher, ttl_s=100.0, clock=clock)
    results = await asyncio.gather(*(cache.rules(f"{base}/articles/{i}") for i in range(5)))
    assert {r.status for r in results} == {"parsed"}
    assert app["hits"]["/robots.txt"] == 1
    clock.now += 99.0
    await cache.rules(base + "/about")
    assert app["hits"]["/robots.txt"] == 1
    clock.now += 2.0
    await cache.rules(base + "/about")
    assert app["hits"]["/robots.txt"] == 2


async def test_unreachable_results_expire_sooner(site: tuple[web.Application, str], fetcher: Fetcher) -> None:
    app, base = site
    app["config"].robots_status = 503
    clock = Clock()
    cache = RobotsCache(fetcher, ttl_s=86400.0, clock=clock, error_ttl_s=60.0)
    assert (await cache.rules(base + "/")).status == "unreachable"
    app["config"].robots_status = 200
    clock.now += 61.0
    assert (await cache.rules(base + "/")).status == "parsed"
    assert app["hits"]["/robots.txt"] == 2


async def test_ten_megabyte_robots_is_truncated_not_refused(
    site: tuple[web.Application, str], fetcher: Fetcher
) -> None:
    app, base = site
    head = b"User-agent: *\nDisallow: /early/\n"
    app["config"].robots_body = (
        head + b"# padding\n" * (10 * 2**20 // 10) + b"User-agent: *\nDisallow: /late/\n"
    )
    rules = await RobotsCache(fetcher).rules(base + "/")
    assert rules.status == "parsed"
    assert not rules.allowed(base + "/early/x", UA)
    assert rules.allowed(base + "/late/x", UA)  # beyond 500 KiB: not read


@pytest.mark.parametrize(
    "body",
    [
        os.urandom(200_000),
        b"\xff\xfe\xfa User-agent: *\nDisallow: /\xc3\x28/\n\x00\x00",
        "\n".join(f"User-agent: bot{i}\nDisallow: /p{i}/" for i in range(50_000)).encode(),
        b"Disallow: /\nAllow\nUser-agent\n:::\nCrawl-delay: soon\nSitemap:\n" * 1000,
        b"",
    ],
)
def test_hostile_robots_never_raise(body: bytes) -> None:
    rules = parse_robots("http://example.com", body)
    assert rules.status == "parsed"
    assert isinstance(rules.allowed("http://example.com/x", UA), bool)
    delay = rules.crawl_delay(UA)
    assert delay is None or delay >= 0
    assert isinstance(rules.sitemaps(), list)
    assert isinstance(rules.ai_bots_blocked(), list)


def test_parse_limit_is_500_kib() -> None:
    body = b"User-agent: *\n" + b"#" * (MAX_ROBOTS_BYTES - 20) + b"\nDisallow: /cut/\n"
    assert parse_robots("http://example.com", body).allowed("http://example.com/cut/x", UA)


def test_ai_bots_blocked_by_group() -> None:
    body = (
        b"User-agent: ClaudeBot\nUser-agent: CCBot\nDisallow: /\n\n"
        b"User-agent: Google-Extended\nDisallow: /private/\n\n"
        b"User-agent: *\nAllow: /\n"
    )
    rules = parse_robots("https://example.com", body)
    assert rules.ai_bots_blocked() == ["ClaudeBot", "CCBot"]
    assert rules.ai_bots_blocked(["PerplexityBot", "CCBot"]) == ["CCBot"]


def test_product_token_and_origin() -> None:
    assert product_token("LLMOBot/1.0 (+https://x)") == "LLMOBot"
    assert (
        product_token("Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; ClaudeBot/1.0)")
        == "ClaudeBot"
    )
    assert origin_of("HTTPS://Example.com:443/a?b") == "https://example.com"
    assert origin_of("http://example.com:8080/") == "http://example.com:8080"


def test_only_answer_engine_crawlers_count_as_blocked_for_a_page() -> None:
    """Regression: blocking a training crawler (CCBot, GPTBot) once capped every page's score."""
    body = (b"User-agent: CCBot\nDisallow: /\n\nUser-agent: GPTBot\nDisallow: /\n\n"
            b"User-agent: PerplexityBot\nDisallow: /private/\n")
    rules = parse_robots("https://a.example", body)
    assert rules.answer_crawlers_blocked("https://a.example/post") == []
    assert rules.answer_crawlers_blocked("https://a.example/private/x") == ["PerplexityBot"]
    assert set(rules.ai_bots_blocked()) == {"CCBot", "GPTBot"}
