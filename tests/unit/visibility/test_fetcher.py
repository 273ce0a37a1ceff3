"""The fetcher against the local test site: SSRF refusals, limits, redirects, caching, decoding."""

from __future__ import annotations

import asyncio
import gzip
import socket
import zlib
from collections.abc import AsyncIterator
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from llmo.visibility.fetcher import Fetcher, FetchResult
from llmo.visibility.netguard import DEFAULT_POLICY, AddressPolicy, GuardedResolver, ssrf_address_forms
from tests.unit.visibility.site import make_site, serve_site
from tests.unit.visibility.test_netguard import FakeResolver

UA = "LLMOBot/1.0 (+https://llmo.example/bot)"
LOCAL = AddressPolicy(["127.0.0.1"])


@pytest.fixture
async def site() -> AsyncIterator[tuple[web.Application, str]]:
    app = make_site(pages=10)
    async with serve_site(app) as base:
        yield app, base


@pytest.fixture
async def fetcher() -> AsyncIterator[Fetcher]:
    async with Fetcher(user_agent=UA, policy=LOCAL, timeout_s=10.0) as f:
        yield f


def _traced_session(policy: AddressPolicy, inner: FakeResolver) -> tuple[aiohttp.ClientSession, list[str]]:
    """A session whose resolver answers from a table, recording every connection it opens."""
    connections: list[str] = []

    async def on_connection(session: aiohttp.ClientSession, ctx: SimpleNamespace, params: object) -> None:
        connections.append("connected")

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_connection)
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy, inner))
    return aiohttp.ClientSession(
        connector=connector, trace_configs=[trace], auto_decompress=False
    ), connections


async def test_allowlisted_test_site_is_reachable(
    site: tuple[web.Application, str], fetcher: Fetcher
) -> None:
    app, base = site
    result = await fetcher.fetch(base + "/articles/1")
    assert result.ok, result.error_message
    assert result.status == 200
    assert result.content_type == "text/html"
    assert "How answer engines rank source 1" in result.text
    assert app["log"][-1][1:] == ("/articles/1", UA)


async def test_loopback_is_refused_before_connecting_without_the_allowlist(
    site: tuple[web.Application, str],
) -> None:
    app, base = site
    async with Fetcher(user_agent=UA) as strict:
        result = await strict.fetch(base + "/articles/1")
    assert result.error_reason == "SSRF_BLOCKED"
    assert result.status == 0
    assert app["hits"]["/articles/1"] == 0


async def test_every_hostile_form_is_refused_without_traffic() -> None:
    inner = FakeResolver({})
    session, connections = _traced_session(DEFAULT_POLICY, inner)
    async with session, Fetcher(user_agent=UA, session=session) as strict:
        results = [(url, await strict.fetch(url)) for url, _ in ssrf_address_forms()]
    refused = [url for url, result in results if result.error_reason == "SSRF_BLOCKED"]
    assert refused == [url for url, _ in results], [(u, r.error_reason) for u, r in results]
    assert connections == []
    assert inner.calls == []  # nothing needed a lookup, so nothing could leave the machine


async def test_redirect_to_metadata_is_refused_at_that_hop(
    site: tuple[web.Application, str], fetcher: Fetcher
) -> None:
    _, base = site
    result = await fetcher.fetch(base + "/evil-redirect")
    assert result.error_reason == "SSRF_BLOCKED"
    assert result.redirects == ["http://169.254.169.254/latest/meta-data/"]
    assert "metadata" in result.error_message


async def test_name_resolving_to_loopback_is_refused_by_the_resolver(
    site: tuple[web.Application, str],
) -> None:
    app, base = site
    port = base.rsplit(":", 1)[1]
    inner = FakeResolver({"rebind.test": ["127.0.0.1"]})
    session, connections = _traced_session(DEFAULT_POLICY, inner)
    async with session, Fetcher(user_agent=UA, session=session) as strict:
        result = await strict.fetch(f"http://rebind.test:{port}/about")
    assert result.error_reason == "SSRF_BLOCKED"
    assert inner.calls == ["rebind.test"]
    assert connections == []
    assert app["hits"]["/about"] == 0


async def test_name_resolving_to_an_allowlisted_address_connects(site: tuple[web.Application, str]) -> None:
    _, base = site
    port = base.rsplit(":", 1)[1]
    session, connections = _traced_session(LOCAL, FakeResolver({"site.test": ["127.0.0.1"]}))
    async with session, Fetcher(user_agent=UA, session=session) as lenient:
        result = await lenient.fetch(f"http://site.test:{port}/about")
    assert result.ok, result.error_message
    assert connections == ["connected"]


async def test_localhost_is_refused_by_the_real_resolver(site: tuple[web.Application, str]) -> None:
    _, base = site
    resolver = GuardedResolver(DEFAULT_POLICY)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver)) as session:
        with pytest.raises(aiohttp.ClientConnectorError):
            await session.get(base.replace("127.0.0.1", "localhost"))
    async with Fetcher(user_agent=UA) as strict:
        assert (await strict.fetch(base.replace("127.0.0.1", "localhost"))).error_reason == "SSRF_BLOCKED"


async def test_redirect_chain_is_followed(site: tuple[web.Application, str], fetcher: Fetcher) -> None:
    _, base = site
    result = await fetcher.fetch(base + "/old")
    assert result.ok
    assert result.redirects == [base + "/moved", base + "/articles/1"]
    assert result.final_url == base + "/articles/1"
    assert result.url == base + "/old"


async def test_redirect_loop(site: tuple[web.Application, str], fetcher: Fetcher) -> None:
    _, base = site
    result = await fetcher.fetch(base + "/loop-a")
    assert result.error_reason == "REDIRECT_LOOP"


async def test_too_many_redirects(site: tuple[web.Application, str], fetcher: Fetcher) -> None:
    _, base = site
    assert (await fetcher.fetch(base + "/chain/5")).ok
    result = await fetcher.fetch(base + "/chain/6")
    assert result.error_reason == "TOO_MANY_REDIRECTS"
    assert len(result.redirects) == 5


async def test_huge_page_is_too_large(site: tuple[web.Application, str], fetcher: Fetcher) -> None:
    _, base = site
    declared = await fetcher.fetch(base + "/huge")
    assert declared.error_reason == "TOO_LARGE"
    assert declared.body == b""
    streamed = await fetcher.fetch(base + "/huge-chunked")
    assert streamed.error_reason == "TOO_LARGE"


async def test_gzip_bomb_is_stopped(site: tuple[web.Application, str], fetcher: Fetcher) -> None:
    _, base = site
    result = await fetcher.fetch(base + "/bomb")
    assert result.error_reason == "DECOMPRESSION_BOMB"
    assert result.body == b""


async def test_gzip_responses_are_decoded(site: tuple[web.Application, str], fetcher: Fetcher) -> None:
    _, base = site
    result = await fetcher.fetch(base + "/about")
    assert result.ok
    assert result.headers.get("content-encoding") in ("gzip", "deflate")
    assert b"About Acme Analytics" in result.body


async def _encoded_site(body: bytes, encoding: str) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Content-Type": "text/html", "Content-Encoding": encoding})

    app = web.Application()
    app.router.add_get("/", handler)
    return app


@pytest.mark.parametrize(
    ("encoded", "encoding"),
    [
        (gzip.compress(b"<p>hello</p>") + gzip.compress(b"<p>again</p>"), "gzip"),
        (zlib.compress(b"<p>hello</p><p>again</p>"), "deflate"),
        (zlib.compress(b"<p>hello</p><p>again</p>")[2:-4], "deflate"),  # raw deflate, as some servers send
    ],
)
async def test_content_encodings(fetcher: Fetcher, encoded: bytes, encoding: str) -> None:
    async with serve_site(await _encoded_site(encoded, encoding)) as base:
        result = await fetcher.fetch(base + "/")
    assert result.ok, result.error_message
    assert result.body == b"<p>hello</p><p>again</p>"


async def test_high_ratio_body_is_a_bomb_even_below_the_size_limit() -> None:
    async with (
        serve_site(await _encoded_site(gzip.compress(bytes(3 * 2**20)), "gzip")) as base,
        Fetcher(user_agent=UA, policy=LOCAL, max_bytes=4 * 2**20) as f,
    ):
        result = await f.fetch(base + "/")
    assert result.error_reason == "DECOMPRESSION_BOMB"


async def test_conditional_fetch_returns_not_modified(
    site: tuple[web.Application, str], fetcher: Fetcher
) -> None:
    _, base = site
    first = await fetcher.fetch(base + "/articles/3")
    etag, modified = first.headers["etag"], first.headers["last-modified"]
    by_etag = await fetcher.fetch(base + "/articles/3", etag=etag)
    assert (by_etag.status, by_etag.not_modified, by_etag.error_reason, by_etag.ok) == (304, True, None, True)
    by_date = await fetcher.fetch(base + "/articles/3", last_modified=modified)
    assert by_date.not_modified
    stale = await fetcher.fetch(base + "/articles/3", etag='"something-else"')
    assert stale.status == 200 and not stale.not_modified


async def test_content_type_filter(site: tuple[web.Application, str], fetcher: Fetcher) -> None:
    _, base = site
    refused = await fetcher.fetch(base + "/file.pdf")
    assert refused.error_reason == "UNSUPPORTED_CONTENT_TYPE"
    assert refused.content_type == "application/pdf"
    accepted = await fetcher.fetch(base + "/file.pdf", accept=())
    assert accepted.ok and accepted.body.startswith(b"%PDF")
    assert (await fetcher.fetch(base + "/file.pdf", accept=("application/pdf",))).ok


async def test_http_errors_keep_the_body(site: tuple[web.Application, str], fetcher: Fetcher) -> None:
    _, base = site
    failed = await fetcher.fetch(base + "/server-error")
    assert (failed.status, failed.error_reason) == (500, "HTTP_ERROR")
    assert b"Something broke" in failed.body
    missing = await fetcher.fetch(base + "/missing-page")
    assert (missing.status, missing.error_reason, missing.ok) == (404, "HTTP_ERROR", False)


async def test_broken_encoding_decodes(site: tuple[web.Application, str], fetcher: Fetcher) -> None:
    _, base = site
    result = await fetcher.fetch(base + "/latin1")
    assert result.ok
    assert result.encoding == "utf-8"
    assert "\ufffd" in result.text
    assert "la carte" in result.text


def test_text_uses_header_then_meta_charset() -> None:
    body = '<meta charset="windows-1252"><p>Café</p>'.encode("cp1252")
    assert "Café" in FetchResult(url="u", final_url="u", body=body).text
    assert (
        "Café"
        in FetchResult(url="u", final_url="u", body="Café".encode("latin-1"), encoding="iso8859-1").text
    )
    bogus = FetchResult(url="u", final_url="u", body=b'<meta charset="no-such-codec">\xff\xfe')
    assert bogus.text.endswith("\ufffd\ufffd")


@pytest.mark.parametrize("url", ["ftp://example.com/x", "not a url", "http:///nohost", "javascript:alert(1)"])
async def test_invalid_urls(fetcher: Fetcher, url: str) -> None:
    assert (await fetcher.fetch(url)).error_reason == "INVALID_URL"


async def test_redirect_to_another_scheme_is_invalid(fetcher: Fetcher) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "file:///etc/passwd"})

    app = web.Application()
    app.router.add_get("/", handler)
    async with serve_site(app) as base:
        result = await fetcher.fetch(base + "/")
    assert result.error_reason == "INVALID_URL"


async def test_network_error_on_a_closed_port(fetcher: Fetcher) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = await fetcher.fetch(f"http://127.0.0.1:{port}/")
    assert result.error_reason == "NETWORK_ERROR"
    assert result.status == 0


async def test_slow_server_times_out() -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/html"})
        await response.prepare(request)
        await response.write(b"<p>")
        await release.wait()
        return response

    release = asyncio.Event()
    app = web.Application()
    app.router.add_get("/", slow)
    async with serve_site(app) as base, Fetcher(user_agent=UA, policy=LOCAL, timeout_s=0.3) as f:
        result = await f.fetch(base + "/")
        release.set()
    assert result.error_reason == "FETCH_TIMEOUT"
