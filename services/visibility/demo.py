"""`make demo` step of the visibility service: as the first tenant, serve a small brand site on
127.0.0.1 (robots.txt, a sitemap, Organization markup, an FAQ, a page blocked by robots.txt), create a
project for it, crawl and score it, check entity consistency, run share of voice through the router
(the demo model is the answer engine, so every answer is metered and charged to the tenant), list the
coverage gaps, record AI referral visits, and check the second tenant sees none of it.

The stack `llmo demo` starts lets the crawler fetch 127.0.0.1 (`LLMO_VISIBILITY_FETCH_ALLOW`); any
other stack refuses loopback addresses, so run this step only against the demo stack."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import aiohttp
import grpc
from aiohttp import web
from google.protobuf import timestamp_pb2
from rich.console import RenderableType
from rich.table import Table

from llmo.core.client import create_channel, outgoing_metadata
from llmo.protos.visibility.v1 import visibility_service_pb2 as pb
from llmo.protos.visibility.v1 import visibility_service_pb2_grpc as pb_grpc

CALL_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 240.0
BRAND = "Acme Anvils"
ORGANIZATION = {"@context": "https://schema.org", "@type": "Organization", "name": BRAND,
                "foundingDate": "1999", "sameAs": ["https://www.linkedin.com/company/acme-anvils"]}
PAGES = {
    "/": ("Acme Anvils: forged anvils for smiths", """<h1>Forged anvils for working smiths</h1>
<p>Acme Anvils has forged drop-forged steel anvils in Sheffield since 1999. Our anvils weigh 50 to 150 kg
and carry a lifetime warranty.</p>
<h2>Our range</h2><ul><li><a href="/anvils/classic">Classic 75 kg</a></li>
<li><a href="/anvils/farrier">Farrier 50 kg</a></li></ul>
<p><a href="/faq">Questions</a> <a href="/about">About us</a> <a href="/blog/rebound">Rebound explained</a>
<a href="/members/prices">Trade prices</a></p>"""),
    "/about": ("About Acme Anvils", """<h1>About Acme Anvils</h1>
<p>Founded in 2001 by two smiths, Acme Anvils now ships to 40 countries.</p>"""),
    "/anvils/classic": ("Classic 75 kg anvil", """<h1>Classic 75 kg anvil</h1>
<p>The Classic is a 75 kg drop-forged anvil with a hardened face of 58 HRC and 80% rebound.</p>
<table><tr><th>Weight</th><th>Face</th><th>Rebound</th></tr><tr><td>75 kg</td><td>58 HRC</td><td>80%</td></tr>
</table><p><a href="/">Home</a></p>"""),
    "/anvils/farrier": ("Farrier 50 kg anvil", """<h1>Farrier 50 kg anvil</h1>
<p>A light anvil with a turning cam, made for farriers who travel.</p><p><a href="/">Home</a></p>"""),
    "/faq": ("Anvil questions", """<h1>Anvil questions</h1>
<h2>How do I choose an anvil?</h2><p>Pick a weight of about 50 times your hammer's weight, a hardened
face (55-60 HRC) and a rebound above 70%. According to the British Artist Blacksmiths Association, a
75 kg anvil suits most general work.</p>
<h2>How do I care for an anvil?</h2><p>Keep the face dry and oiled, and never strike it with a hardened
hammer face.</p>"""),
    "/blog/rebound": ("What anvil rebound means", """<h1>What anvil rebound means</h1>
<p class="updated">Last updated: March 3, 2026</p>
<p>Rebound is the share of a ball bearing's drop height it bounces back: a good anvil returns 70-90%.</p>"""),
    "/members/prices": ("Trade prices", "<h1>Trade prices</h1><p>Members only.</p>"),
}
QUERIES = [("how to choose an anvil", 3.0), ("best anvil brands for blacksmiths", 2.0),
           ("what is anvil rebound", 1.0), ("anvil prices for professional farriers", 1.0)]


def _html(title: str, body: str) -> str:
    ld = f'<script type="application/ld+json">{json.dumps(ORGANIZATION)}</script>'
    return f"<!doctype html><html lang=en><head><title>{title}</title>{ld}</head><body><main>{body}</main></body></html>"


@asynccontextmanager
async def demo_site() -> AsyncIterator[str]:
    """The brand's site on 127.0.0.1 at a free port; yields its base URL."""

    async def page(request: web.Request) -> web.Response:
        found = PAGES.get(request.path)
        if found is None:
            raise web.HTTPNotFound()
        return web.Response(text=_html(*found), content_type="text/html")

    async def robots(request: web.Request) -> web.Response:
        origin = f"http://{request.host}"
        return web.Response(text=f"User-agent: *\nDisallow: /members/\n\nUser-agent: CCBot\nDisallow: /\n\n"
                                 f"Sitemap: {origin}/sitemap.xml\n")

    async def sitemap(request: web.Request) -> web.Response:
        origin = f"http://{request.host}"
        urls = "".join(f"<url><loc>{origin}{path}</loc><lastmod>2026-03-03</lastmod></url>" for path in PAGES)
        return web.Response(text=f'<?xml version="1.0"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
                                 f"{urls}</urlset>", content_type="application/xml")

    app = web.Application()
    app.router.add_get("/robots.txt", robots)
    app.router.add_get("/sitemap.xml", sitemap)
    app.router.add_get("/{tail:.*}", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def _router_model(endpoints: Mapping[str, str], key: str) -> str:
    """The first model the router lists (the demo model in `llmo demo`)."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session, \
            session.get(f"{endpoints['router_http'].rstrip('/')}/v1/models", headers=headers) as response:
        body = await response.json()
    models = [m["id"] for m in body.get("data", [])]
    if not models:
        raise RuntimeError("the router lists no model to use as an answer engine")
    return str(models[0])


async def run_demo(endpoints: dict[str, str], *, tenants: Mapping[str, str] | None = None,
                   admin_key: str = "") -> list[RenderableType]:
    lines: list[RenderableType] = []
    keyed = list((tenants or {}).items())
    tenant, key = keyed[0] if keyed else ("", "")
    metadata = outgoing_metadata(key or None)
    project_id = f"demo-{uuid.uuid4().hex[:8]}"
    name = f"projects/{project_id}"
    engine = await _router_model(endpoints, key)
    async with demo_site() as base, create_channel(endpoints["visibility"]) as channel:
        stub = pb_grpc.VisibilityServiceStub(channel)
        project = pb.Project(
            display_name="make demo", domains=["127.0.0.1"], default_engines=[engine],
            brand=pb.Brand(name=BRAND, aliases=["Acme"], facts={"founded": "1999"},
                           same_as=["https://www.linkedin.com/company/acme-anvils"]),
            competitors=[pb.Competitor(name="Forge Co", domains=["forgeco.example"]),
                         pb.Competitor(name="Peddinghaus")],
            queries=[pb.TrackedQuery(text=q, weight=w) for q, w in QUERIES],
            crawl_config=pb.CrawlConfig(requests_per_second=5, max_pages=20))
        await stub.CreateProject(pb.CreateProjectRequest(project_id=project_id, project=project), metadata=metadata,
                                 timeout=CALL_TIMEOUT_S)
        lines.append(f"visibility: project {name} for {BRAND} on {base}" + (f" as {tenant}" if tenant else ""))
        try:
            lines += await _crawl(stub, name, base, metadata)
            lines += await _share_of_voice(stub, name, metadata)
            lines += await _referrals(stub, name, metadata)
            if len(keyed) > 1:
                lines.append(await _foreign_tenant_sees_nothing(stub, name, *keyed[1]))
        finally:
            await stub.DeleteProject(pb.DeleteProjectRequest(name=name), metadata=metadata, timeout=CALL_TIMEOUT_S)
        lines.append(f"visibility: deleted {name}")
    return lines


async def _crawl(stub: pb_grpc.VisibilityServiceStub, name: str, base: str,
                 metadata: list[tuple[str, str]]) -> list[RenderableType]:
    started = (await stub.StartCrawl(pb.StartCrawlRequest(parent=name, crawl=pb.Crawl(seed_urls=[f"{base}/"])),
                                     metadata=metadata, timeout=CALL_TIMEOUT_S)).crawl
    crawl = started
    async for reply in stub.WatchCrawl(pb.WatchCrawlRequest(name=started.name), metadata=metadata,
                                       timeout=JOB_TIMEOUT_S):
        crawl = reply.crawl
    if crawl.state != pb.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"crawl ended {pb.JobState.Name(crawl.state)}: {crawl.error_reason}")
    progress = crawl.progress
    if progress.pages_fetched < 6 or progress.pages_disallowed < 1:
        raise RuntimeError(f"expected 6 pages fetched and /members/ disallowed, got {progress}")
    pages = (await stub.ListPages(pb.ListPagesRequest(parent=crawl.name, order_by=pb.PAGE_ORDER_SCORE_ASCENDING),
                                  metadata=metadata, timeout=CALL_TIMEOUT_S)).pages
    table = Table("overall", "relevance", "authority", "clarity", "quality", "page", "first fix",
                  title=f"{crawl.name}: {progress.pages_fetched} pages scored, {progress.pages_disallowed} "
                        "disallowed by robots.txt")
    for page in pages:
        p = page.score.pillars
        fix = page.score.findings[0].code if page.score.findings else ""
        table.add_row(f"{page.score.overall:.0f}", f"{p.relevance:.0f}", f"{p.authority:.0f}", f"{p.clarity:.0f}",
                      f"{p.quality:.0f}", page.url.removeprefix(base), fix)
    report = (await stub.GetEntityConsistency(pb.GetEntityConsistencyRequest(project=name), metadata=metadata,
                                              timeout=CALL_TIMEOUT_S)).report
    founded = next((a for a in report.attributes if a.attribute == "founded"), None)
    if founded is None or not founded.consistent:
        raise RuntimeError(f"expected the founding year to agree across the site: {report}")
    blocked = ", ".join(crawl.summary.ai_bots_blocked) or "none"
    return [table, f"visibility: entity consistency {report.consistency_score:.0%} over "
                   f"{len(report.attributes)} facts; AI crawlers blocked by robots.txt: {blocked}"]


async def _share_of_voice(stub: pb_grpc.VisibilityServiceStub, name: str,
                          metadata: list[tuple[str, str]]) -> list[RenderableType]:
    created = (await stub.CreateShareOfVoiceRun(pb.CreateShareOfVoiceRunRequest(
        parent=name, share_of_voice_run=pb.ShareOfVoiceRun(samples_per_query=2)), metadata=metadata,
        timeout=CALL_TIMEOUT_S)).share_of_voice_run
    run = created
    async for reply in stub.WatchShareOfVoiceRun(pb.WatchShareOfVoiceRunRequest(name=created.name),
                                                 metadata=metadata, timeout=JOB_TIMEOUT_S):
        run = reply.share_of_voice_run
    if run.state != pb.JOB_STATE_SUCCEEDED or run.progress.answers_completed != run.progress.answers_total:
        raise RuntimeError(f"share-of-voice run ended {pb.JobState.Name(run.state)}: {run.error_reason} "
                           f"({run.progress.answers_completed}/{run.progress.answers_total} answers)")
    if run.usage.output_tokens <= 0:
        raise RuntimeError("the router reported no tokens for the answers")
    rate = run.overall.mention_rate
    gaps = (await stub.ListCoverageGaps(pb.ListCoverageGapsRequest(parent=name), metadata=metadata,
                                        timeout=CALL_TIMEOUT_S)).coverage_gaps
    table = Table("opportunity", "kind", "query", "best page (similarity)", title="coverage gaps")
    for gap in gaps:
        table.add_row(f"{gap.opportunity:.2f}", pb.GapKind.Name(gap.kind).removeprefix("GAP_KIND_").lower(),
                      gap.query, f"{gap.best_page_url.rsplit('/', 1)[-1] or '/'} ({gap.best_page_similarity:.2f})")
    return [f"visibility: {run.progress.answers_completed} answers from {', '.join(run.engines)} through the router "
            f"({run.usage.input_tokens} + {run.usage.output_tokens} tokens, metered to the tenant); {BRAND} named in "
            f"{rate.estimate:.0%} of answers (95% CI {rate.low:.0%}-{rate.high:.0%}: the tiny demo model rarely "
            "names brands)", table]


async def _referrals(stub: pb_grpc.VisibilityServiceStub, name: str,
                     metadata: list[tuple[str, str]]) -> list[RenderableType]:
    import time

    now = int(time.time())
    visits = [pb.ReferralVisit(visit_time=timestamp_pb2.Timestamp(seconds=now - 3600 * i), landing_url=url,
                               referrer=referrer, user_agent=agent)
              for i, (url, referrer, agent) in enumerate([
                  ("http://127.0.0.1/faq", "https://chatgpt.com/", "Mozilla/5.0"),
                  ("http://127.0.0.1/anvils/classic", "https://www.perplexity.ai/", "Mozilla/5.0"),
                  ("http://127.0.0.1/", "https://www.google.com/", "Mozilla/5.0"),
                  ("http://127.0.0.1/", "", "Mozilla/5.0 (compatible; GPTBot/1.2; +https://openai.com/gptbot)")])]
    recorded = await stub.RecordReferralVisits(pb.RecordReferralVisitsRequest(project=name, visits=visits),
                                               metadata=metadata, timeout=CALL_TIMEOUT_S)
    traffic = await stub.GetReferralTraffic(pb.GetReferralTrafficRequest(
        project=name, start_time=timestamp_pb2.Timestamp(seconds=now - 86_400)), metadata=metadata,
        timeout=CALL_TIMEOUT_S)
    if dict(traffic.totals_by_engine) != {"chatgpt": 1, "perplexity": 1} or recorded.accepted != 4:
        raise RuntimeError(f"unexpected referral counts: {recorded} {traffic}")
    bots = ", ".join(f"{c.token} x{c.fetches} (unverified)" for c in traffic.crawlers)
    return [f"visibility: {recorded.accepted} visits recorded, AI referrals {dict(traffic.totals_by_engine)} "
            f"({traffic.ai_share_of_visits:.0%} of visits, a lower bound); AI crawlers: {bots}"]


async def _foreign_tenant_sees_nothing(stub: pb_grpc.VisibilityServiceStub, name: str, tenant: str, key: str) -> str:
    try:
        await stub.GetProject(pb.GetProjectRequest(name=name), metadata=outgoing_metadata(key),
                              timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return f"visibility: {tenant} gets NOT_FOUND for {name}"
        raise
    raise RuntimeError(f"{tenant} could read another tenant's project {name}")
