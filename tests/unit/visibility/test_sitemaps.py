"""Sitemap parsing (urlset, index, gzip, text, lastmod, hostile XML) and discovery."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from aiohttp import web

from llmo.visibility.fetcher import Fetcher
from llmo.visibility.netguard import AddressPolicy
from llmo.visibility.sitemaps import discover, parse_lastmod, parse_sitemap
from tests.unit.visibility.site import make_site, serve_site

NS = 'xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"'
URLSET = f"""<?xml version="1.0" encoding="UTF-8"?>
<urlset {NS}>
  <url><loc> https://example.com/a </loc><lastmod>2024-05-06</lastmod><priority>0.8</priority></url>
  <url><loc>https://example.com/b</loc><lastmod>2024-05-06T10:30:00+02:00</lastmod></url>
  <url><loc>https://example.com/c</loc></url>
  <url><loc>javascript:alert(1)</loc></url>
</urlset>""".encode()


@pytest.fixture
async def site() -> AsyncIterator[tuple[web.Application, str]]:
    app = make_site(pages=12)
    async with serve_site(app) as base:
        yield app, base


@pytest.fixture
async def fetcher() -> AsyncIterator[Fetcher]:
    async with Fetcher(user_agent="LLMOBot/1.0", policy=AddressPolicy(["127.0.0.1"])) as f:
        yield f


def test_urlset() -> None:
    sitemap = parse_sitemap(URLSET)
    assert sitemap.error is None
    assert [e.loc for e in sitemap.urls] == [
        "https://example.com/a",
        "https://example.com/b",
        "https://example.com/c",
    ]
    assert sitemap.urls[0].lastmod == datetime(2024, 5, 6, tzinfo=UTC)
    assert sitemap.urls[1].lastmod == datetime(2024, 5, 6, 8, 30, tzinfo=UTC)
    assert sitemap.urls[2].lastmod is None
    assert sitemap.sitemaps == []


def test_sitemap_index() -> None:
    body = (
        f"<sitemapindex {NS}><sitemap><loc>https://example.com/s1.xml</loc><lastmod>2024-01-01</lastmod></sitemap>"
        "<sitemap><loc>https://example.com/s2.xml.gz</loc></sitemap></sitemapindex>"
    ).encode()
    sitemap = parse_sitemap(body)
    assert sitemap.error is None
    assert sitemap.sitemaps == ["https://example.com/s1.xml", "https://example.com/s2.xml.gz"]
    assert sitemap.urls == []


def test_gzip_and_without_namespace() -> None:
    body = gzip.compress(b"<urlset><url><loc>https://example.com/x</loc></url></urlset>")
    assert [e.loc for e in parse_sitemap(body).urls] == ["https://example.com/x"]


def test_plain_text_sitemap() -> None:
    body = b"https://example.com/one\n\n  https://example.com/two  \nnot a url\nftp://example.com/no\n"
    sitemap = parse_sitemap(body)
    assert sitemap.error is None
    assert [e.loc for e in sitemap.urls] == ["https://example.com/one", "https://example.com/two"]


def test_gzip_bomb_is_refused() -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(2**20)
    bomb = b"".join(compressor.compress(chunk) for _ in range(64)) + compressor.flush()
    assert len(bomb) < 2**20
    assert parse_sitemap(bomb, max_bytes=8 * 2**20).error == "DECOMPRESSION_BOMB"


def test_xxe_is_not_resolved(tmp_path: object) -> None:
    body = (
        b'<?xml version="1.0"?><!DOCTYPE urlset [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
        b"<urlset><url><loc>https://example.com/&xxe;</loc></url><url><loc>&xxe;</loc></url></urlset>"
    )
    sitemap = parse_sitemap(body)
    for entry in sitemap.urls:
        assert "root:" not in entry.loc
    assert all(e.loc.startswith("https://example.com/") for e in sitemap.urls)


def test_billion_laughs_does_not_expand() -> None:
    entities = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    body = (
        f'<?xml version="1.0"?><!DOCTYPE urlset [<!ENTITY l0 "lol">{entities}]>'
        "<urlset><url><loc>https://example.com/&l9;</loc></url></urlset>"
    ).encode()
    sitemap = parse_sitemap(body)
    assert all(len(e.loc) < 1000 for e in sitemap.urls)


async def test_external_dtd_is_never_fetched(site: tuple[web.Application, str]) -> None:
    app, base = site
    body = (
        f'<?xml version="1.0"?><!DOCTYPE urlset SYSTEM "{base}/evil.dtd">'
        "<urlset><url><loc>https://example.com/a</loc></url></urlset>"
    ).encode()
    sitemap = parse_sitemap(body)
    assert [e.loc for e in sitemap.urls] == ["https://example.com/a"]
    assert app["hits"]["/evil.dtd"] == 0


@pytest.mark.parametrize(
    "body",
    [
        b"<urlset><url><loc>https://example.com/a</loc></url>",
        b"<urlset><url><loc>https://example.com/a</loc></urlset>",
        b"<html><body>Not a sitemap</body></html>",
        b"<?xml version='1.0'?>",
        b"<",
        b"\x1f\x8b\x08\x00garbage",
    ],
)
def test_malformed_sitemaps(body: bytes) -> None:
    assert parse_sitemap(body).error == "MALFORMED_SITEMAP"


def test_max_urls_caps_the_entries() -> None:
    rows = "".join(f"<url><loc>https://example.com/{i}</loc></url>" for i in range(30))
    sitemap = parse_sitemap(f"<urlset {NS}>{rows}</urlset>".encode(), max_urls=10)
    assert len(sitemap.urls) == 10
    assert sitemap.error == "TOO_MANY_URLS"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024", datetime(2024, 1, 1, tzinfo=UTC)),
        ("2024-05", datetime(2024, 5, 1, tzinfo=UTC)),
        ("2024-05-06", datetime(2024, 5, 6, tzinfo=UTC)),
        ("2024-05-06T10:30Z", datetime(2024, 5, 6, 10, 30, tzinfo=UTC)),
        (
            "2024-05-06T10:30:15.25-05:00",
            datetime(2024, 5, 6, 10, 30, 15, 250000, tzinfo=timezone(timedelta(hours=-5))),
        ),
        ("2024-05-06T10:30:15", datetime(2024, 5, 6, 10, 30, 15, tzinfo=UTC)),
        ("yesterday", None),
        ("2024-13-01", None),
        ("", None),
    ],
)
def test_lastmod_forms(value: str, expected: datetime | None) -> None:
    assert parse_lastmod(value) == expected


async def test_discover_follows_the_index(site: tuple[web.Application, str], fetcher: Fetcher) -> None:
    app, base = site
    entries = await discover(fetcher, [base + "/sitemap_index.xml"])
    locs = {e.loc for e in entries}
    assert {f"{base}/articles/{i}" for i in range(12)} <= locs
    assert base + "/about" in locs
    assert len(locs) == len(entries)
    # the index lists itself: each sitemap is still fetched exactly once
    assert app["hits"]["/sitemap_index.xml"] == 1
    assert app["hits"]["/sitemap-pages.xml.gz"] == 1
    assert app["hits"]["/sitemap-blog.xml"] == 1
    article = next(e for e in entries if e.loc == f"{base}/articles/3")
    assert article.lastmod == datetime(2024, 5, 4, 12, 0, tzinfo=UTC)


async def test_discover_respects_limits(site: tuple[web.Application, str], fetcher: Fetcher) -> None:
    _, base = site
    only_index = await discover(fetcher, [base + "/sitemap_index.xml"], max_sitemaps=1)
    assert only_index == []
    capped = await discover(fetcher, [base + "/sitemap_index.xml"], max_urls=5)
    assert len(capped) == 5


async def test_discover_skips_failing_sitemaps(site: tuple[web.Application, str], fetcher: Fetcher) -> None:
    _, base = site
    entries = await discover(
        fetcher, [base + "/missing.xml", base + "/sitemap-blog.xml", "http://10.0.0.1/s.xml"]
    )
    assert base + "/about" in {e.loc for e in entries}
