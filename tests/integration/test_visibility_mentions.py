"""Third-party mention sources over real gRPC: the brand's own site on 127.0.0.1 (the project's domain)
and a second site, addressed as `localhost`, with pages that name the brand, one that does not, one
gone (404), one robots.txt disallows and one that redirects back to the brand's site. Each source is
fetched once, at the configured pace and before the brand's own pages; the crawl summary counts exactly
the sources naming the brand, and every page's authority pillar scores that count."""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from google.protobuf import field_mask_pb2

from llmo.protos.visibility.v1 import visibility_service_pb2 as pb
from llmo.protos.visibility.v1 import visibility_service_pb2_grpc as pb_grpc
from tests.integration.visibility_harness import (
    A,
    all_pages,
    code_of,
    project,
    settings,
    started,
    watch_crawl,
)
from tests.unit.visibility.site import make_site, serve_site

pytestmark = pytest.mark.timeout(300)

RATE = 4.0  # requests per second per host in these crawls: starts at least 0.25 s apart
ROBOTS = b"User-agent: *\nDisallow: /private/\n"  # the brand's site without a Crawl-delay: quick crawls


def _article(title: str, text: str) -> str:
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{title}</title></head><body>"
            "<nav><a href=/>Reviews home</a> <a href=/more>More reviews</a></nav>"
            f"<main><article><h1>{title}</h1>{text}</article></main><footer>Review Hub</footer></body></html>")


REVIEW = _article("The best anvil suppliers of 2025", (
    "<p>We ordered anvils from six suppliers and tested each one for a month in a working forge.</p>"
    "<p>Acme Corp shipped in two days and its anvils held up best under daily use; Globex came second, "
    "with a good price but a softer face. We would buy from Acme again.</p>"))
PRESS = _article("Forge makers raise prices", (
    "<p>Several forge equipment makers raised prices this spring, citing the cost of steel.</p>"
    "<p>A spokesperson for Acme said the company would keep its prices until the end of the year.</p>"))
DIRECTORY = _article("Anvil suppliers directory", (
    "<p>Suppliers listed this month: Initech, Globex and a few smaller workshops in Acmeville.</p>"
    "<p>Listings are free; write to us to be added to the directory.</p>"))
HIDDEN = _article("Members listing", "<p>Acme is the members' favourite supplier.</p>")


def third_party_site(brand_site: str) -> web.Application:
    app = web.Application()
    log: list[tuple[float, str]] = []
    hits: Counter[str] = Counter()

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        log.append((time.monotonic(), request.path))
        hits[request.path] += 1
        return await handler(request)

    def page(html: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(text=html, content_type="text/html")
        return handler

    async def robots(request: web.Request) -> web.Response:
        return web.Response(text="User-agent: *\nDisallow: /private/\n", content_type="text/plain")

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{brand_site}/about")

    app.middlewares.append(record)
    app.router.add_get("/robots.txt", robots)
    app.router.add_get("/review", page(REVIEW))
    app.router.add_get("/press", page(PRESS))
    app.router.add_get("/directory", page(DIRECTORY))
    app.router.add_get("/private/listing", page(HIDDEN))
    app.router.add_get("/moved", moved)
    with warnings.catch_warnings():  # plain string keys, as the brand's site has them
        warnings.simplefilter("ignore", web.NotAppKeyWarning)
        app["log"], app["hits"] = log, hits
    return app


@pytest.fixture
async def sites() -> AsyncIterator[tuple[str, web.Application, str, web.Application]]:
    brand = make_site(pages=8)
    brand["config"].robots_body = ROBOTS
    async with serve_site(brand) as base:
        other = third_party_site(base)
        async with serve_site(other) as other_base:
            # The same server under another host name: a different host to the crawler (and its pacer).
            yield base, brand, other_base.replace("127.0.0.1", "localhost"), other


@pytest.fixture
async def stub(tmp_path: Path) -> AsyncIterator[pb_grpc.VisibilityServiceStub]:
    # Politeness on (at RATE per host), and `localhost` allowed besides 127.0.0.1: the second site.
    running, channel, client = await started(settings(f"sqlite:///{tmp_path / 'v.db'}", tmp_path,
                                                      fetch_allow="127.0.0.1,localhost"))
    yield client
    await channel.close()
    await running.stop()


def sources_of(third: str) -> list[str]:
    return [f"{third}/review", f"{third}/press", f"{third}/directory", f"{third}/gone", f"{third}/private/listing",
            f"{third}/moved", f"{third}/review#comments", "http://169.254.169.254/latest/meta-data/"]


async def crawl(stub: pb_grpc.VisibilityServiceStub, base: str, crawl_id: str, max_pages: int = 4) -> pb.Crawl:
    await stub.StartCrawl(pb.StartCrawlRequest(parent="projects/acme", crawl_id=crawl_id, crawl=pb.Crawl(
        seed_urls=[f"{base}/"], config=pb.CrawlConfig(max_pages=max_pages, requests_per_second=RATE))), metadata=A)
    final = (await watch_crawl(stub, f"projects/acme/crawls/{crawl_id}"))[-1].crawl
    assert final.state == pb.JOB_STATE_SUCCEEDED, final
    return final


def authority(page: pb.Page) -> dict[str, pb.Signal]:
    return {s.name: s for s in page.score.signals if s.pillar == pb.PILLAR_AUTHORITY}


async def test_the_crawl_counts_the_sources_naming_the_brand_and_every_page_scores_that_count(
        stub: pb_grpc.VisibilityServiceStub, sites: tuple[str, web.Application, str, web.Application]) -> None:
    base, brand_site, third, other = sites
    await stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project(
        mention_sources=sources_of(third))), metadata=A)
    final = await crawl(stub, base, "c1")

    summary = final.summary
    assert summary.third_party_mentions == 2
    by_url = {s.url.replace(third, ""): s for s in summary.mention_sources}
    # One entry per distinct source, in the project's order (the #comments duplicate is the review page).
    assert list(by_url) == ["/review", "/press", "/directory", "/gone", "/private/listing", "/moved",
                            "http://169.254.169.254/latest/meta-data/"]
    review, press = by_url["/review"], by_url["/press"]
    assert review.mentions_brand and review.http_status == 200 and not review.error_reason
    assert review.matched == "Acme Corp" and review.brand_mentions == 2 and list(review.competitors) == ["Globex"]
    assert "Acme Corp shipped in two days" in review.snippet
    assert press.mentions_brand and press.matched == "Acme" and not press.competitors
    directory = by_url["/directory"]  # names competitors, and "Acmeville", which is not the brand
    assert not directory.mentions_brand and directory.http_status == 200 and not directory.error_reason
    assert list(directory.competitors) == ["Initech", "Globex"]
    assert (by_url["/gone"].error_reason, by_url["/gone"].http_status) == ("HTTP_ERROR", 404)
    assert by_url["/private/listing"].error_reason == "ROBOTS_DISALLOWED"
    assert by_url["/moved"].error_reason == "OWN_DOMAIN"  # it lands on the brand's own site
    metadata = by_url["http://169.254.169.254/latest/meta-data/"]
    assert metadata.error_reason == "ROBOTS_UNREACHABLE" and not metadata.mentions_brand  # SSRF-refused
    assert not any(s.mentions_brand for s in summary.mention_sources if s.error_reason)

    # Fetched once each, robots.txt first, and the disallowed one never; at the configured pace.
    hits = other["hits"]
    assert {path: hits[path] for path in ("/robots.txt", "/review", "/press", "/directory", "/gone", "/moved")} == {
        "/robots.txt": 1, "/review": 1, "/press": 1, "/directory": 1, "/gone": 1, "/moved": 1}
    assert hits["/private/listing"] == 0 and other["log"][0][1] == "/robots.txt"
    starts = [t for t, _ in other["log"]]
    assert min(b - a for a, b in pairwise(starts)) >= 1 / RATE - 0.01, starts
    # ... before any of the brand's own pages (discovery aside).
    first_article = min(t for t, path, _ in brand_site["log"] if path.startswith("/articles/") or path == "/")
    assert max(starts) < first_article

    # Sources are neither pages nor counted as pages: max_pages is the brand's pages alone.
    assert final.progress.pages_fetched + final.progress.pages_failed == 4
    pages = await all_pages(stub, final.name)
    assert pages and all(p.url.startswith(base) for p in pages)
    scored = [p for p in pages if not p.error_reason]
    assert scored
    for page in scored:
        signal = authority(page)["third_party_mentions"]
        assert (signal.value, signal.weight) == (2, 0.25), page.url
        assert signal.score == pytest.approx(100 * math.log(3) / math.log(21), abs=0.1)

    # ScorePage for the project uses the latest succeeded crawl's count; without a project it is left out.
    html = "<html><head><title>Anvils</title></head><body><h1>Anvils</h1><p>We make anvils.</p></body></html>"
    with_project = (await stub.ScorePage(pb.ScorePageRequest(project="projects/acme", html=html), metadata=A)).page
    assert authority(with_project)["third_party_mentions"].value == 2
    alone = (await stub.ScorePage(pb.ScorePageRequest(html=html), metadata=A)).page
    assert "third_party_mentions" not in authority(alone)


async def test_without_sources_the_signal_is_left_out_until_the_project_lists_some(
        stub: pb_grpc.VisibilityServiceStub, sites: tuple[str, web.Application, str, web.Application]) -> None:
    base, _, third, other = sites
    created = (await stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project()),
                                        metadata=A)).project
    first = await crawl(stub, base, "c1")
    assert first.summary.third_party_mentions == 0 and not first.summary.mention_sources
    assert not other["log"]  # nothing asked of the other site
    pages = [p for p in await all_pages(stub, first.name) if not p.error_reason]
    assert pages
    for page in pages:
        signals = authority(page)
        assert "third_party_mentions" not in signals
        assert sum(s.weight for s in signals.values()) == pytest.approx(1.0)  # the others rescaled
    html = "<html><head><title>Anvils</title></head><body><h1>Anvils</h1></body></html>"
    scored = (await stub.ScorePage(pb.ScorePageRequest(project="projects/acme", html=html), metadata=A)).page
    assert "third_party_mentions" not in authority(scored)

    # The project lists sources: the next crawl scores every page with the count, the pages that answer
    # 304 included (they were scored without it, so they are fetched whole and scored again).
    updated = pb.Project(name="projects/acme", etag=created.etag, mention_sources=[f"{third}/review",
                                                                                   f"{third}/directory"])
    await stub.UpdateProject(pb.UpdateProjectRequest(project=updated, update_mask=field_mask_pb2.FieldMask(
        paths=["mention_sources"])), metadata=A)
    second = await crawl(stub, base, "c2")
    assert second.summary.third_party_mentions == 1 and len(second.summary.mention_sources) == 2
    for page in [p for p in await all_pages(stub, second.name) if not p.error_reason]:
        assert authority(page)["third_party_mentions"].value == 1, page.url
    # A third crawl with the same count keeps the unchanged pages as they were scored.
    third_crawl = await crawl(stub, base, "c3")
    assert third_crawl.progress.pages_unchanged >= 1
    for page in [p for p in await all_pages(stub, third_crawl.name) if not p.error_reason]:
        assert authority(page)["third_party_mentions"].value == 1, page.url
    assert other["hits"]["/review"] == 2 and other["hits"]["/directory"] == 2  # once per crawl


async def test_bad_mention_sources_are_refused(stub: pb_grpc.VisibilityServiceStub) -> None:
    bad_sources = (["reviews.example/acme"], ["ftp://reviews.example/acme"], ["https://127.0.0.1/press"],
                   ["https://reviews.example/" + "a" * 2048], [f"https://site{i}.example/" for i in range(201)])
    for sources in bad_sources:
        assert await code_of(stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project(
            mention_sources=sources)), metadata=A)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MENTION_SOURCE")
    created = (await stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project(
        mention_sources=["https://reviews.example/acme"])), metadata=A)).project
    assert list(created.mention_sources) == ["https://reviews.example/acme"]
    changed = pb.Project(name="projects/acme", etag=created.etag, mention_sources=["https://sub.127.0.0.1/x"])
    assert await code_of(stub.UpdateProject(pb.UpdateProjectRequest(project=changed, update_mask=(
        field_mask_pb2.FieldMask(paths=["mention_sources"]))), metadata=A)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MENTION_SOURCE")
    # The refused update stored nothing.
    kept = (await stub.GetProject(pb.GetProjectRequest(name="projects/acme"), metadata=A)).project
    assert list(kept.mention_sources) == ["https://reviews.example/acme"]
