"""A local test site for crawler tests: polite-crawling signals, traps and hostile responses.

app = make_site(pages=30)
async with serve_site(app) as base:   # "http://127.0.0.1:{port}"
    ...
app["log"]   # [(monotonic time, path, user agent), ...] for politeness checks
app["hits"]  # Counter of paths
app["config"].robots_status = 500     # change how /robots.txt answers, while serving
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import uuid
import warnings
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

from aiohttp import web

ARTICLE_MODIFIED = datetime(2024, 5, 6, 12, 0, tzinfo=UTC)
ORG_NAME = "Acme Analytics"
BOMB_BYTES = 2**30
HUGE_BYTES = 8 * 2**20
LLMS_TXT = """# Acme Analytics

> Acme Analytics measures how answer engines cite brands.

Acme publishes articles on search visibility.

## Docs

- [Getting started](/articles/1): the first steps
- [About us](/about)

## Optional

- [Archive](/sitemap-blog.xml): every older post
"""


@dataclass
class SiteConfig:
    """How the site answers, changeable while it serves."""

    robots_status: int = 200
    robots_body: bytes | None = None  # None: the default robots.txt
    robots_redirect: str | None = None  # a path /robots.txt redirects to


# Plain string keys, as other tests read them: app["log"], app["hits"], app["config"].
CONFIG = "config"
LOG = "log"
HITS = "hits"


def _origin(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def _page(title: str, body: str, head: str = "") -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>{head}</head>'
        f'<body><header><nav><a href="/">Home</a> <a href="/about">About</a></nav></header>'
        f"<main>{body}</main><footer>&copy; 2024 {ORG_NAME}</footer></body></html>"
    )


def _organization(i: int) -> dict[str, object]:
    # A few pages disagree with the rest about the brand: entity-consistency checks need them.
    inconsistent = i % 7 == 3
    return {
        "@context": "https://schema.org",
        "@type": "Organization",
        "name": "ACME Analytic Inc." if inconsistent else ORG_NAME,
        "url": "https://acme.example",
        "logo": "https://acme.example/logo-old.png" if inconsistent else "https://acme.example/logo.png",
        "sameAs": (
            ["https://twitter.com/acme_old"]
            if inconsistent
            else ["https://www.linkedin.com/company/acme-analytics", "https://twitter.com/acmeanalytics"]
        ),
    }


def article_html(i: int, pages: int) -> str:
    """The HTML of /articles/{i}."""
    modified = ARTICLE_MODIFIED.replace(day=1 + i % 28)
    ld: list[dict[str, object]] = [
        {
            "@context": "https://schema.org",
            "@type": "Article",
            "headline": f"How answer engines rank source {i}",
            "datePublished": "2023-11-02",
            "dateModified": modified.date().isoformat(),
            "author": {"@type": "Person", "name": "Dana Reyes"},
        }
    ]
    if i % 2 == 0:
        ld.append(_organization(i))
    head = "".join(f'<script type="application/ld+json">{json.dumps(item)}</script>' for item in ld)
    table = (
        "<table><thead><tr><th>Engine</th><th>Citations</th><th>Share</th></tr></thead><tbody>"
        f"<tr><td>Engine A</td><td>{120 + i}</td><td>{31 + i % 9}%</td></tr>"
        f"<tr><td>Engine B</td><td>{80 + i}</td><td>{22 + i % 5}%</td></tr></tbody></table>"
        if i % 3 == 0
        else ""
    )
    links = " ".join(
        f'<a href="/articles/{j}">Related article {j}</a>'
        for j in sorted({(i + 1) % pages, (i * 7 + 3) % pages})
    )
    body = f"""
<article>
<h1>How answer engines rank source {i}</h1>
<p class="updated">Last updated: {modified.strftime("%B %d, %Y")}</p>
<p>Answer engines cite roughly {40 + i % 20}% of their sources from pages that state a clear answer in the
first paragraph. In a 2024 study of 12,000 queries, pages with structured data were cited 2.3 times as
often as pages without it.</p>
<h2>What the data shows</h2>
<p>According to <a href="https://www.nature.com/articles/d41586-024-0{i:04d}">Nature</a> and the
<a href="https://en.wikipedia.org/wiki/Search_engine_optimization">Wikipedia overview</a>, citation rates
rose by {5 + i % 7} percentage points between 2022 and 2024.</p>
<h3>Key findings</h3>
<ul><li>Short answers first</li><li>Dated statistics</li><li>Named sources</li></ul>
{table}
<h2>Frequently asked questions</h2>
<h3>Does freshness matter?</h3>
<p>Yes: {60 + i % 30}% of cited pages were updated within a year.</p>
<p>{links} <a href="/private/secret">Members area</a> <a href="/missing-page">Old report</a>
<a href="/server-error">Status</a> <a href="/calendar?month=1">Events</a> <a href="/old">Archive</a>
<a href="/articles/dup">Printable version</a> <a href="/shop;jsessionid=A1B2C3D4E5">Shop</a></p>
</article>"""
    return _page(f"Article {i}", body, head)


@web.middleware
async def _record(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    request.app[LOG].append((time.monotonic(), request.path, request.headers.get("User-Agent", "")))
    request.app[HITS][request.path] += 1
    return await handler(request)


def _html(text: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8", headers=headers)


async def _robots(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    if config.robots_redirect:
        raise web.HTTPFound(config.robots_redirect)
    body = config.robots_body
    if body is None:
        body = (
            "User-agent: GPTBot\nDisallow: /\n\n"
            "User-agent: *\nDisallow: /private/\nCrawl-delay: 1\n\n"
            f"Sitemap: {_origin(request)}/sitemap_index.xml\n"
        ).encode()
    return web.Response(body=body, status=config.robots_status, content_type="text/plain")


def _urlset(entries: Sequence[tuple[str, str | None]]) -> bytes:
    rows = "".join(
        f"<url><loc>{loc}</loc>{f'<lastmod>{lastmod}</lastmod>' if lastmod else ''}</url>"
        for loc, lastmod in entries
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">{rows}</urlset>'
    ).encode()


def make_site(pages: int = 30) -> web.Application:
    """The test site application with `pages` article pages."""
    app = web.Application(middlewares=[_record])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", web.NotAppKeyWarning)
        app[CONFIG] = SiteConfig()
        app[LOG] = []
        app[HITS] = Counter()
    last_modified = format_datetime(ARTICLE_MODIFIED, usegmt=True)

    async def sitemap_index(request: web.Request) -> web.Response:
        origin = _origin(request)
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
            f"<sitemap><loc>{origin}/sitemap-pages.xml.gz</loc><lastmod>2024-05-06</lastmod></sitemap>"
            f"<sitemap><loc>{origin}/sitemap-blog.xml</loc></sitemap>"
            f"<sitemap><loc>{origin}/sitemap_index.xml</loc></sitemap>"  # a cycle back to itself
            "</sitemapindex>"
        ).encode()
        return web.Response(body=body, content_type="application/xml")

    async def sitemap_pages(request: web.Request) -> web.Response:
        origin = _origin(request)
        entries = [
            (f"{origin}/articles/{i}", f"2024-05-{1 + i % 28:02d}T12:00:00+00:00") for i in range(pages)
        ]
        return web.Response(body=gzip.compress(_urlset(entries)), content_type="application/gzip")

    async def sitemap_blog(request: web.Request) -> web.Response:
        origin = _origin(request)
        entries = [
            (f"{origin}/about", "2024-01-15"),
            (f"{origin}/llms.txt", None),
            (f"{origin}/articles/0", None),
        ]
        return web.Response(body=_urlset(entries), content_type="application/xml")

    async def article(request: web.Request) -> web.Response:
        i = int(request.match_info["i"])
        if i >= pages:
            raise web.HTTPNotFound()
        etag = f'"article-{i}-v1"'
        headers = {"ETag": etag, "Last-Modified": last_modified}
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        since = request.headers.get("If-Modified-Since")
        if since:
            try:
                if parsedate_to_datetime(since) >= ARTICLE_MODIFIED:
                    return web.Response(status=304, headers=headers)
            except (TypeError, ValueError):
                pass
        return _html(article_html(i, pages), headers=headers)

    async def duplicate(request: web.Request) -> web.Response:
        head = f'<link rel="canonical" href="{_origin(request)}/articles/2">'
        return _html(
            _page("Article 2 (print)", "<h1>How answer engines rank source 2</h1><p>Print view.</p>", head)
        )

    async def about(request: web.Request) -> web.Response:
        response = _html(_page("About Acme", f"<h1>About {ORG_NAME}</h1><p>We measure brand visibility.</p>"))
        response.enable_compression()
        return response

    def redirect(location: str, status: int = 301) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(status=status, headers={"Location": location})

        return handler

    async def chain(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n <= 0:
            return _html(_page("End of chain", "<h1>End</h1>"))
        return web.Response(status=302, headers={"Location": f"/chain/{n - 1}"})

    async def calendar(request: web.Request) -> web.Response:
        month = int(request.query.get("month", "1") or 1)
        body = f'<h1>Events in month {month}</h1><p>No events.</p><a href="/calendar?month={month + 1}">Next month</a>'
        return _html(_page(f"Calendar {month}", body))

    async def shop(request: web.Request) -> web.Response:
        body = (
            "<h1>Shop</h1>"
            f'<a href="/shop;jsessionid={uuid.uuid4().hex}">Continue</a> '
            f'<a href="/cart?sessionid={uuid.uuid4().hex}">Cart</a>'
        )
        return _html(_page("Shop", body))

    async def noindex(request: web.Request) -> web.Response:
        head = '<meta name="robots" content="noindex, follow">'
        return _html(_page("Hidden", "<h1>Not for indexes</h1>", head))

    async def noindex_header(request: web.Request) -> web.Response:
        return _html(_page("Hidden", "<h1>Not for indexes either</h1>"), headers={"X-Robots-Tag": "noindex"})

    async def server_error(request: web.Request) -> web.Response:
        return _html(_page("Error", "<h1>Something broke</h1>"), status=500)

    async def huge(request: web.Request) -> web.Response:
        filler = b"<p>" + b"x" * 1020 + b"</p>"
        return web.Response(body=filler * (HUGE_BYTES // len(filler) + 1), content_type="text/html")

    async def huge_chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/html"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b"<p>" + b"y" * (2**16 - 7) + b"</p>"
        try:
            for _ in range(HUGE_BYTES // len(chunk) + 1):
                if request.transport is None or request.transport.is_closing():
                    return response
                await response.write(chunk)
        except (ConnectionError, RuntimeError):
            return response
        await response.write_eof()
        return response

    async def bomb(request: web.Request) -> web.StreamResponse:
        # 1 GiB of zeros, compressed one MiB at a time as it is sent: never built in memory.
        response = web.StreamResponse(headers={"Content-Type": "text/html", "Content-Encoding": "gzip"})
        await response.prepare(request)
        compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
        zeros = bytes(2**20)
        try:
            for _ in range(BOMB_BYTES // len(zeros)):
                if request.transport is None or request.transport.is_closing():
                    return response  # the client gave up, as it should
                await response.write(compressor.compress(zeros))
                await asyncio.sleep(0)  # small writes never wait: let a client in the same loop run
            await response.write(compressor.flush())
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return response

    async def latin1(request: web.Request) -> web.Response:
        body = _page("Café", "<h1>Café crème à la carte</h1><p>Prix: 5 EUR, très bon.</p>")
        return web.Response(
            body=body.encode("latin-1"),
            headers={"Content-Type": "text/html; charset=utf-8"},
        )

    async def pdf(request: web.Request) -> web.Response:
        body = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
        return web.Response(body=body, content_type="application/pdf")

    async def llms_txt(request: web.Request) -> web.Response:
        return web.Response(text=LLMS_TXT, content_type="text/plain")

    async def index(request: web.Request) -> web.Response:
        links = "".join(f'<li><a href="/articles/{i}">Article {i}</a></li>' for i in range(pages))
        return _html(_page(ORG_NAME, f"<h1>{ORG_NAME}</h1><ul>{links}</ul>"))

    async def private(request: web.Request) -> web.Response:
        return _html(_page("Members", "<h1>Members only</h1>"))

    app.router.add_get("/", index)
    app.router.add_get("/robots.txt", _robots)
    app.router.add_get("/sitemap_index.xml", sitemap_index)
    app.router.add_get("/sitemap-pages.xml.gz", sitemap_pages)
    app.router.add_get("/sitemap-blog.xml", sitemap_blog)
    app.router.add_get("/articles/dup", duplicate)
    app.router.add_get(r"/articles/{i:\d+}", article)
    app.router.add_get("/about", about)
    app.router.add_get("/private/{tail:.*}", private)
    app.router.add_get("/old", redirect("/moved", 301))
    app.router.add_get("/moved", redirect("/articles/1", 302))
    app.router.add_get("/loop-a", redirect("/loop-b", 302))
    app.router.add_get("/loop-b", redirect("/loop-a", 302))
    app.router.add_get("/evil-redirect", redirect("http://169.254.169.254/latest/meta-data/", 302))
    app.router.add_get(r"/chain/{n:\d+}", chain)
    app.router.add_get("/calendar", calendar)
    app.router.add_get("/shop{tail:.*}", shop)
    app.router.add_get("/cart", shop)
    app.router.add_get("/noindex", noindex)
    app.router.add_get("/noindex-header", noindex_header)
    app.router.add_get("/server-error", server_error)
    app.router.add_get("/huge", huge)
    app.router.add_get("/huge-chunked", huge_chunked)
    app.router.add_get("/bomb", bomb)
    app.router.add_get("/latin1", latin1)
    app.router.add_get("/file.pdf", pdf)
    app.router.add_get("/llms.txt", llms_txt)
    return app


@asynccontextmanager
async def serve_site(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1 at a random port; yields the base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
