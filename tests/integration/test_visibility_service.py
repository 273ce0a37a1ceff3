"""The visibility service over real gRPC: projects, crawls of the local test site (robots.txt, sitemaps,
traps, SSRF refusals, hostile pages, conditional re-crawls), page scores, entity consistency,
share-of-voice runs against local answer engines with known mention rates, trends, coverage gaps and
referral traffic."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from aiohttp import web
from google.protobuf import field_mask_pb2, timestamp_pb2

from llmo.protos.visibility.v1 import visibility_service_pb2 as pb
from llmo.protos.visibility.v1 import visibility_service_pb2_grpc as pb_grpc
from llmo.visibility.extract_pool import ExtractionPool
from tests.integration.visibility_harness import (
    A,
    B,
    EngineBehaviour,
    FakeEngines,
    all_pages,
    code_of,
    project,
    settings,
    started,
    watch_crawl,
    watch_run,
)
from tests.unit.visibility.crashing_extract import CRASH_MARK, extract_or_die
from tests.unit.visibility.site import article_html, make_site, serve_site

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def site() -> AsyncIterator[tuple[str, Any]]:
    app = make_site(pages=12)
    async with serve_site(app) as base:
        yield base, app


@pytest.fixture
async def engines() -> AsyncIterator[FakeEngines]:
    fake = await FakeEngines({
        "engine-a": EngineBehaviour(rates={"Acme": 0.7, "Globex": 0.4},
                                    cite={"Acme": "https://127.0.0.1/articles/1", "Globex": "https://globex.example/x"}),
        "engine-b": EngineBehaviour(rates={"Acme": 0.2, "Globex": 0.8, "Initech": 0.3}),
        "broken": EngineBehaviour(rates={}, status=500),
        "garbage": EngineBehaviour(rates={}, garbage=True),
    }).start()
    yield fake
    await fake.stop()


@pytest.fixture
async def stub(tmp_path: Path, engines: FakeEngines) -> AsyncIterator[pb_grpc.VisibilityServiceStub]:
    running, channel, client = await started(settings(f"sqlite:///{tmp_path / 'v.db'}", tmp_path,
                                                      engine_url=engines.url, politeness=False))
    yield client
    await channel.close()
    await running.stop()


async def crawl_site(stub: pb_grpc.VisibilityServiceStub, base: str, crawl_id: str, *extra: str,
                     **config: Any) -> pb.Crawl:
    seeds = [f"{base}/", *[f"{base}{path}" for path in extra]]
    await stub.StartCrawl(pb.StartCrawlRequest(parent="projects/acme", crawl_id=crawl_id, crawl=pb.Crawl(
        seed_urls=seeds, config=pb.CrawlConfig(**config))), metadata=A)
    replies = await watch_crawl(stub, f"projects/acme/crawls/{crawl_id}")
    return replies[-1].crawl


async def test_projects_are_validated_versioned_and_tenant_scoped(stub: pb_grpc.VisibilityServiceStub) -> None:
    created = (await stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project()),
                                        metadata=A)).project
    assert created.name == "projects/acme" and created.etag and created.query_set_version == 1
    for bad, reason in ((project(domains=["https://acme.example/"]), "INVALID_DOMAIN"),
                        (project(domains=[]), "NO_DOMAINS"), (project(brand=pb.Brand()), "MISSING_BRAND"),
                        (project(crawl_config=pb.CrawlConfig(max_pages=20_000)), "INVALID_CRAWL_CONFIG"),
                        (project(queries=[pb.TrackedQuery(text="q", weight=float("nan"))]), "INVALID_WEIGHT")):
        assert await code_of(stub.CreateProject(pb.CreateProjectRequest(project_id="bad", project=bad), metadata=A)) \
            == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert await code_of(stub.CreateProject(pb.CreateProjectRequest(project_id="Bad_Id", project=project()),
                                            metadata=A)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PROJECT_ID")
    assert await code_of(stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project()),
                                            metadata=A)) == (grpc.StatusCode.ALREADY_EXISTS, "PROJECT_ALREADY_EXISTS")
    # Another tenant neither sees nor can touch it, and may use the same id for its own.
    assert await code_of(stub.GetProject(pb.GetProjectRequest(name="projects/acme"), metadata=B)) == (
        grpc.StatusCode.NOT_FOUND, "PROJECT_NOT_FOUND")
    assert not (await stub.ListProjects(pb.ListProjectsRequest(), metadata=B)).projects
    await stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project()), metadata=B)
    # Changing the queries bumps the query set version; a stale etag is refused.
    changed = project()
    changed.name, changed.etag = "projects/acme", created.etag
    changed.queries.append(pb.TrackedQuery(text="anvil reviews"))
    updated = (await stub.UpdateProject(pb.UpdateProjectRequest(project=changed, update_mask=field_mask_pb2.FieldMask(
        paths=["queries"])), metadata=A)).project
    assert updated.query_set_version == 2 and len(updated.queries) == 6
    relabelled = (await stub.UpdateProject(pb.UpdateProjectRequest(project=pb.Project(
        name="projects/acme", labels={"team": "seo"}), update_mask=field_mask_pb2.FieldMask(paths=["labels"])),
        metadata=A)).project
    assert relabelled.query_set_version == 2 and relabelled.labels["team"] == "seo"
    assert await code_of(stub.UpdateProject(pb.UpdateProjectRequest(project=changed), metadata=A)) == (
        grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    assert await code_of(stub.UpdateProject(pb.UpdateProjectRequest(project=pb.Project(name="projects/acme"),
                                            update_mask=field_mask_pb2.FieldMask(paths=["etag"])), metadata=A)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_UPDATE_MASK")
    await stub.DeleteProject(pb.DeleteProjectRequest(name="projects/acme"), metadata=B)
    assert (await stub.GetProject(pb.GetProjectRequest(name="projects/acme"), metadata=A)).project.labels["team"]


async def test_a_crawl_obeys_robots_refuses_internal_addresses_and_scores_every_page(
        stub: pb_grpc.VisibilityServiceStub, site: tuple[str, Any]) -> None:
    base, app = site
    await stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project()), metadata=A)
    assert await code_of(stub.StartCrawl(pb.StartCrawlRequest(parent="projects/acme", crawl=pb.Crawl(
        seed_urls=["https://elsewhere.example/"])), metadata=A)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                     "INVALID_SEED_URL")
    crawl = await crawl_site(stub, base, "c1", "/evil-redirect", "/bomb", "/huge", "/noindex", "/file.pdf",
                             "/latin1", max_pages=60)
    assert crawl.state == pb.JOB_STATE_SUCCEEDED, crawl
    progress = crawl.progress
    assert progress.pages_disallowed >= 1  # /private/ links
    assert progress.pages_trapped >= 1  # the calendar
    assert progress.pages_fetched >= 12 and progress.pages_queued == 0
    assert app["hits"]["/private/secret"] == 0
    assert crawl.summary.llms_txt_found and "GPTBot" in crawl.summary.ai_bots_blocked
    assert 0 < crawl.summary.mean_overall <= 100 and crawl.summary.top_finding_codes
    pages = {p.url.removeprefix(base): p for p in await all_pages(stub, crawl.name)}
    assert pages["/evil-redirect"].error_reason == "SSRF_BLOCKED"
    assert pages["/bomb"].error_reason == "DECOMPRESSION_BOMB"
    assert pages["/huge"].error_reason == "TOO_LARGE"
    assert pages["/file.pdf"].error_reason == "UNSUPPORTED_CONTENT_TYPE"
    assert pages["/noindex"].noindex
    assert pages["/latin1"].word_count > 0 and not pages["/latin1"].error_reason
    article = pages["/articles/3"]
    assert article.http_status == 200 and article.version == 1 and article.content_hash
    assert "Article" in article.schema_types and article.word_count > 50
    score = article.score
    assert score.pillars.relevance_applicable and all(0 <= v <= 100 for v in (
        score.pillars.relevance, score.pillars.authority, score.pillars.clarity, score.pillars.quality))
    assert all(f.recommendation for f in score.findings) and score.signals
    # The site blocks GPTBot, a training crawler: that keeps no page out of answers, so it caps no score.
    assert "AI_BOTS_BLOCKED" not in {f.code for f in score.findings} and score.overall > 20
    # The printable duplicate canonicalises to /articles/2: one page, not two.
    assert "/articles/dup" not in pages or pages["/articles/dup"].canonical_url.endswith("/articles/2")
    full = (await stub.GetPage(pb.GetPageRequest(name=article.name), metadata=A)).page
    assert "answer engines" in full.main_text.lower()
    lowest = (await stub.ListPages(pb.ListPagesRequest(parent=crawl.name, order_by=pb.PAGE_ORDER_SCORE_ASCENDING,
                                                       page_size=3), metadata=A)).pages
    assert [p.score.overall for p in lowest] == sorted(p.score.overall for p in lowest)
    assert await code_of(stub.GetPage(pb.GetPageRequest(name=article.name), metadata=B)) == (
        grpc.StatusCode.NOT_FOUND, "PROJECT_NOT_FOUND")
    # Entity consistency over the crawl: the site states two founding years.
    report = (await stub.GetEntityConsistency(pb.GetEntityConsistencyRequest(project="projects/acme"),
                                              metadata=A)).report
    assert report.crawl == crawl.name and 0 <= report.consistency_score <= 1
    assert {a.attribute for a in report.attributes} >= {"name", "founded"}

    # A re-crawl asks conditionally: unchanged articles answer 304 and keep their version.
    again = await crawl_site(stub, base, "c2", max_pages=60)
    assert again.state == pb.JOB_STATE_SUCCEEDED and again.progress.pages_unchanged >= 10
    repeat = {p.url.removeprefix(base): p for p in await all_pages(stub, again.name)}
    assert repeat["/articles/3"].not_modified and repeat["/articles/3"].version == 1
    crawls = (await stub.ListCrawls(pb.ListCrawlsRequest(parent="projects/acme"), metadata=A)).crawls
    assert [c.name.rsplit("/", 1)[-1] for c in crawls] == ["c2", "c1"]


async def test_one_active_crawl_per_project_cancel_and_delete(tmp_path: Path, site: tuple[str, Any]) -> None:
    base, _ = site
    # Politeness on with the site's Crawl-delay of 1 s: the crawl is slow enough to cancel.
    running, channel, stub = await started(settings(f"sqlite:///{tmp_path / 'v.db'}", tmp_path))
    try:
        await stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project()), metadata=A)
        first = (await stub.StartCrawl(pb.StartCrawlRequest(parent="projects/acme", crawl_id="slow", request_id="r1",
                                                            crawl=pb.Crawl(seed_urls=[f"{base}/"])),
                                       metadata=A)).crawl
        retried = (await stub.StartCrawl(pb.StartCrawlRequest(parent="projects/acme", crawl_id="slow", request_id="r1",
                                                              crawl=pb.Crawl(seed_urls=[f"{base}/"])),
                                         metadata=A)).crawl
        assert retried.name == first.name
        assert await code_of(stub.StartCrawl(pb.StartCrawlRequest(parent="projects/acme", crawl=pb.Crawl(
            seed_urls=[f"{base}/"])), metadata=A)) == (grpc.StatusCode.FAILED_PRECONDITION, "CRAWL_ALREADY_RUNNING")
        assert await code_of(stub.DeleteProject(pb.DeleteProjectRequest(name="projects/acme"), metadata=A)) == (
            grpc.StatusCode.FAILED_PRECONDITION, "JOBS_ACTIVE")
        async with asyncio.timeout(60):
            async for reply in stub.WatchCrawl(pb.WatchCrawlRequest(name=first.name), metadata=A):
                if reply.crawl.progress.pages_fetched >= 2:
                    break
        await stub.CancelCrawl(pb.CancelCrawlRequest(name=first.name), metadata=A)
        final = (await watch_crawl(stub, first.name))[-1].crawl
        assert final.state == pb.JOB_STATE_CANCELLED and 2 <= final.progress.pages_fetched < 12
        kept = await all_pages(stub, first.name)
        assert len(kept) >= 2
        await stub.DeleteProject(pb.DeleteProjectRequest(name="projects/acme"), metadata=A)
        assert await code_of(stub.GetCrawl(pb.GetCrawlRequest(name=first.name), metadata=A)) == (
            grpc.StatusCode.NOT_FOUND, "PROJECT_NOT_FOUND")
    finally:
        await channel.close()
        await running.stop()


async def test_the_per_host_rate_never_exceeds_the_configured_one(tmp_path: Path) -> None:
    app = make_site(pages=5)
    async with serve_site(app) as base:
        running, channel, stub = await started(settings(f"sqlite:///{tmp_path / 'v.db'}", tmp_path, min_delay_s=0.0))
        try:
            await stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project()), metadata=A)
            await stub.StartCrawl(pb.StartCrawlRequest(parent="projects/acme", crawl_id="paced", crawl=pb.Crawl(
                seed_urls=[f"{base}/"], config=pb.CrawlConfig(requests_per_second=4, concurrency=2, max_pages=8))),
                metadata=A)
            final = (await watch_crawl(stub, "projects/acme/crawls/paced"))[-1].crawl
            assert final.state == pb.JOB_STATE_SUCCEEDED
        finally:
            await channel.close()
            await running.stop()
        requests = [t for t, _, _ in app["log"]]
        assert len(requests) >= 8
        gaps = [b - a for a, b in itertools.pairwise(requests)]
        # Every request is paced, discovery included: the first (robots.txt) at the configured 4/s, every
        # one after it at robots.txt's Crawl-delay of 1 s, which is slower and wins.
        assert gaps[0] >= 0.24 and min(gaps[1:]) >= 0.95, gaps


async def test_share_of_voice_runs_measure_mentions_with_intervals_and_detect_change(
        stub: pb_grpc.VisibilityServiceStub, engines: FakeEngines) -> None:
    await stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project(
        default_engines=["engine-a", "engine-b"])), metadata=A)
    for bad, reason, code in ((pb.ShareOfVoiceRun(samples_per_query=11), "INVALID_SAMPLES",
                               grpc.StatusCode.INVALID_ARGUMENT),
                              (pb.ShareOfVoiceRun(engines=["no-such-model"]), "ENGINE_NOT_FOUND",
                               grpc.StatusCode.NOT_FOUND)):
        assert await code_of(stub.CreateShareOfVoiceRun(pb.CreateShareOfVoiceRunRequest(
            parent="projects/acme", share_of_voice_run=bad), metadata=A)) == (code, reason)
    created = (await stub.CreateShareOfVoiceRun(pb.CreateShareOfVoiceRunRequest(
        parent="projects/acme", share_of_voice_run_id="r1", share_of_voice_run=pb.ShareOfVoiceRun(
            samples_per_query=6)), metadata=A)).share_of_voice_run
    assert created.progress.answers_total == 5 * 2 * 6 and created.query_set_version == 1
    snapshots = await watch_run(stub, created.name)
    run = snapshots[-1]
    assert run.state == pb.JOB_STATE_SUCCEEDED, run
    assert run.progress.answers_completed == 60 and run.progress.answers_failed == 0
    assert run.usage.output_tokens == 60 * 20 and run.cost.micros == 60 * 5
    by_engine = {e.engine: e for e in run.engine_shares}
    a = {b.brand: b for b in by_engine["engine-a"].brands}
    b = {b.brand: b for b in by_engine["engine-b"].brands}
    assert a["Acme"].is_project_brand and a["Acme"].mention_rate.estimate > b["Acme"].mention_rate.estimate
    for share in (a["Acme"], b["Globex"], run.overall):
        for interval in (share.mention_rate, share.mention_share, share.citation_rate, share.demand_weighted_share):
            assert interval.low <= interval.estimate <= interval.high
    assert a["Acme"].citations > 0 and a["Acme"].citation_rate.estimate > 0
    assert 0 < run.overall_share_of_voice < 1 and not run.changes
    # Every answer was charged to the tenant who started the run.
    assert {h.get("x-llmo-tenant") for h in engines.headers} == {"tenantA"}
    answers = (await stub.ListAnswers(pb.ListAnswersRequest(parent=created.name, page_size=100), metadata=A)).answers
    assert len(answers) == 60 and all(x.text for x in answers)
    assert any("Acme" in x.brands_mentioned for x in answers)

    # The brand drops out of engine-a's answers: the next run reports a significant change.
    engines.behaviours["engine-a"].rates["Acme"] = 0.05
    second = (await stub.CreateShareOfVoiceRun(pb.CreateShareOfVoiceRunRequest(
        parent="projects/acme", share_of_voice_run_id="r2", share_of_voice_run=pb.ShareOfVoiceRun(
            samples_per_query=6)), metadata=A)).share_of_voice_run
    done = (await watch_run(stub, second.name))[-1]
    assert done.previous_run == created.name
    changes = {c.engine: c for c in done.changes}
    assert changes["engine-a"].significant and changes["engine-a"].difference.estimate < 0
    assert changes["engine-a"].p_value < 0.05
    trend = (await stub.GetShareOfVoiceTrend(pb.GetShareOfVoiceTrendRequest(
        project="projects/acme", engines=["engine-a"], granularity=pb.GRANULARITY_HOUR), metadata=A)).points
    acme = [p for p in trend if p.brand == "Acme"]
    assert acme and all(p.mention_rate.low <= p.mention_rate.estimate <= p.mention_rate.high for p in acme)
    listed = (await stub.ListShareOfVoiceRuns(pb.ListShareOfVoiceRunsRequest(parent="projects/acme"),
                                              metadata=A)).share_of_voice_runs
    assert [r.name for r in listed] == [second.name, created.name]
    assert await code_of(stub.GetShareOfVoiceRun(pb.GetShareOfVoiceRunRequest(name=created.name), metadata=B)) == (
        grpc.StatusCode.NOT_FOUND, "PROJECT_NOT_FOUND")


async def test_engines_that_fail_fail_their_answers_not_the_run(stub: pb_grpc.VisibilityServiceStub) -> None:
    await stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project()), metadata=A)
    mixed = (await stub.CreateShareOfVoiceRun(pb.CreateShareOfVoiceRunRequest(
        parent="projects/acme", share_of_voice_run=pb.ShareOfVoiceRun(engines=["engine-a", "broken", "garbage"],
                                                                      queries=["best anvil supplier"],
                                                                      samples_per_query=2)), metadata=A)
             ).share_of_voice_run
    run = (await watch_run(stub, mixed.name))[-1]
    assert run.state == pb.JOB_STATE_SUCCEEDED
    assert (run.progress.answers_completed, run.progress.answers_failed) == (2, 4)
    reasons = {a.engine: a.error_reason for a in (await stub.ListAnswers(pb.ListAnswersRequest(
        parent=mixed.name), metadata=A)).answers}
    assert reasons == {"engine-a": "", "broken": "ENGINE_UNAVAILABLE", "garbage": "ENGINE_BAD_OUTPUT"}
    dead = (await stub.CreateShareOfVoiceRun(pb.CreateShareOfVoiceRunRequest(
        parent="projects/acme", share_of_voice_run=pb.ShareOfVoiceRun(engines=["broken"], queries=["q"])),
        metadata=A)).share_of_voice_run
    failed = (await watch_run(stub, dead.name))[-1]
    assert failed.state == pb.JOB_STATE_FAILED and failed.error_reason == "ALL_ANSWERS_FAILED"


async def test_coverage_gaps_name_missing_queries_with_their_nearest_passages(
        stub: pb_grpc.VisibilityServiceStub, site: tuple[str, Any]) -> None:
    base, _ = site
    await stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project(queries=[
        pb.TrackedQuery(text="how do answer engines choose which sources to cite"),
        pb.TrackedQuery(text="recipe for sourdough bread with rye flour")])), metadata=A)
    assert await code_of(stub.ListCoverageGaps(pb.ListCoverageGapsRequest(parent="projects/acme"), metadata=A)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "NO_COMPLETED_RUN")
    await crawl_site(stub, base, "c1", max_pages=15)
    run = (await stub.CreateShareOfVoiceRun(pb.CreateShareOfVoiceRunRequest(
        parent="projects/acme", share_of_voice_run=pb.ShareOfVoiceRun(engines=["engine-b"], samples_per_query=3)),
        metadata=A)).share_of_voice_run
    await watch_run(stub, run.name)
    gaps = {g.query: g for g in (await stub.ListCoverageGaps(pb.ListCoverageGapsRequest(parent="projects/acme"),
                                                             metadata=A)).coverage_gaps}
    bread = gaps["recipe for sourdough bread with rye flour"]
    assert bread.kind == pb.GAP_KIND_NO_CONTENT and bread.recommendation
    engines_gap = gaps.get("how do answer engines choose which sources to cite")
    if engines_gap is not None:  # the site answers it: never a NO_CONTENT gap
        assert engines_gap.kind != pb.GAP_KIND_NO_CONTENT
        assert engines_gap.best_page_similarity > bread.best_page_similarity
    assert bread.nearest_passages and bread.nearest_passages[0].url.startswith(base)
    opportunities = [g.opportunity for g in gaps.values()]
    assert all(0 <= o <= 1 for o in opportunities)


def _stamp(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


async def test_referral_visits_are_classified_counted_once_and_rejected_per_visit(
        stub: pb_grpc.VisibilityServiceStub) -> None:
    await stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project(
        domains=["acme.example"])), metadata=A)
    day = 1_767_225_600  # 2026-01-01 UTC
    visits = [
        pb.ReferralVisit(visit_id="v1", visit_time=_stamp(day + 60), landing_url="https://acme.example/pricing",
                         referrer="https://chatgpt.com/"),
        pb.ReferralVisit(visit_id="v2", visit_time=_stamp(day + 120), landing_url="https://acme.example/pricing",
                         referrer="https://www.perplexity.ai/search?q=x"),
        pb.ReferralVisit(visit_id="v3", visit_time=_stamp(day + 86_400), landing_url="https://acme.example/docs",
                         utm_source="chatgpt.com", count=3),
        pb.ReferralVisit(visit_id="v4", visit_time=_stamp(day + 200), landing_url="https://acme.example/",
                         referrer="https://www.google.com/"),
        pb.ReferralVisit(visit_id="v5", visit_time=_stamp(day + 300), landing_url="https://acme.example/",
                         user_agent="Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; "
                                    "+https://openai.com/gptbot)"),
        pb.ReferralVisit(visit_time=_stamp(day), landing_url="https://other.example/"),
        pb.ReferralVisit(landing_url="https://acme.example/"),
        pb.ReferralVisit(visit_time=_stamp(day), landing_url="javascript:alert(1)"),
    ]
    reply = await stub.RecordReferralVisits(pb.RecordReferralVisitsRequest(project="projects/acme", visits=visits),
                                            metadata=A)
    assert (reply.accepted, reply.duplicates, reply.ai_referrals) == (5, 0, 3)
    assert [(r.index, r.reason) for r in reply.rejected] == [(5, "DOMAIN_NOT_IN_PROJECT"), (6, "MISSING_VISIT_TIME"),
                                                              (7, "INVALID_URL")]
    again = await stub.RecordReferralVisits(pb.RecordReferralVisitsRequest(project="projects/acme",
                                                                           visits=visits[:2]), metadata=A)
    assert (again.accepted, again.duplicates) == (0, 2)
    traffic = await stub.GetReferralTraffic(pb.GetReferralTrafficRequest(
        project="projects/acme", start_time=_stamp(day - 10), end_time=_stamp(day + 3 * 86_400)), metadata=A)
    assert dict(traffic.totals_by_engine) == {"chatgpt": 4, "perplexity": 1}
    assert [(b.bucket_start_time.seconds, b.engine, b.visits) for b in traffic.buckets] == [
        (day, "chatgpt", 1), (day, "perplexity", 1), (day + 86_400, "chatgpt", 3)]
    assert traffic.ai_share_of_visits == pytest.approx(5 / 6)
    assert traffic.top_pages[0].url == "https://acme.example/docs" and traffic.top_pages[0].visits == 3
    assert [(c.token, c.fetches, c.verified) for c in traffic.crawlers] == [("GPTBot", 1, False)]
    assert "lower bound" in traffic.lower_bound_note.lower()
    assert await code_of(stub.GetReferralTraffic(pb.GetReferralTrafficRequest(
        project="projects/acme", start_time=_stamp(day), end_time=_stamp(day)), metadata=A)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_WINDOW")
    assert await code_of(stub.RecordReferralVisits(pb.RecordReferralVisitsRequest(
        project="projects/acme", visits=[pb.ReferralVisit()] * 10_001), metadata=A)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_VISITS")


async def test_score_page_from_html_or_a_url_that_robots_allows(stub: pb_grpc.VisibilityServiceStub,
                                                                site: tuple[str, Any]) -> None:
    base, _ = site
    html = ("<html><head><title>Anvils</title></head><body><h1>Anvils</h1><h3>Skipped level</h3>"
            "<p>Short.</p></body></html>")
    page = (await stub.ScorePage(pb.ScorePageRequest(html=html, base_url="https://acme.example/a"),
                                 metadata=A)).page
    assert 0 <= page.score.overall <= 100 and not page.score.pillars.relevance_applicable
    assert page.score.findings and all(f.recommendation for f in page.score.findings)
    fetched = (await stub.ScorePage(pb.ScorePageRequest(url=f"{base}/articles/2"), metadata=A)).page
    assert fetched.http_status == 200 and fetched.score.overall > page.score.overall
    assert await code_of(stub.ScorePage(pb.ScorePageRequest(url=f"{base}/private/x"), metadata=A)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "ROBOTS_DISALLOWED")
    assert await code_of(stub.ScorePage(pb.ScorePageRequest(url=f"{base}/server-error"), metadata=A)) == (
        grpc.StatusCode.UNAVAILABLE, "FETCH_FAILED")
    assert await code_of(stub.ScorePage(pb.ScorePageRequest(), metadata=A)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "MISSING_PAGE_SOURCE")
    assert await code_of(stub.ScorePage(pb.ScorePageRequest(html="x" * (5 * 2**20 + 1)), metadata=A)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "PAGE_TOO_LARGE")


async def test_gaps_embed_the_pages_of_a_crawl_made_before_any_query_was_tracked(
        stub: pb_grpc.VisibilityServiceStub, site: tuple[str, Any]) -> None:
    base, _ = site
    created = (await stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project(queries=[])),
                                        metadata=A)).project
    crawl = await crawl_site(stub, base, "c1", max_pages=8)
    pages = await all_pages(stub, crawl.name)
    assert pages and not any(p.score.pillars.relevance_applicable for p in pages if not p.error_reason)
    queries = [pb.TrackedQuery(text="how do answer engines choose which sources to cite"),
               pb.TrackedQuery(text="recipe for sourdough bread with rye flour")]
    await stub.UpdateProject(pb.UpdateProjectRequest(project=pb.Project(
        name="projects/acme", etag=created.etag, queries=queries), update_mask=field_mask_pb2.FieldMask(
        paths=["queries"])), metadata=A)
    run = (await stub.CreateShareOfVoiceRun(pb.CreateShareOfVoiceRunRequest(
        parent="projects/acme", share_of_voice_run=pb.ShareOfVoiceRun(engines=["engine-b"])), metadata=A)
           ).share_of_voice_run
    await watch_run(stub, run.name)
    first = {g.query: g for g in (await stub.ListCoverageGaps(pb.ListCoverageGapsRequest(parent="projects/acme"),
                                                              metadata=A)).coverage_gaps}
    bread = first["recipe for sourdough bread with rye flour"]
    assert bread.kind == pb.GAP_KIND_NO_CONTENT and bread.nearest_passages[0].url.startswith(base)
    again = {g.query: g for g in (await stub.ListCoverageGaps(pb.ListCoverageGapsRequest(parent="projects/acme"),
                                                              metadata=A)).coverage_gaps}
    assert again["recipe for sourdough bread with rye flour"].best_page_similarity == bread.best_page_similarity


async def test_a_page_that_kills_the_extraction_worker_fails_alone_and_the_crawl_goes_on(tmp_path: Path) -> None:
    app = make_site(pages=6)

    async def crashing(_: web.Request) -> web.Response:
        html = article_html(2, 6).replace("<body>", "<body>" + CRASH_MARK.decode(), 1)
        return web.Response(text=html, content_type="text/html")

    app.router.add_get("/crash", crashing)
    async with serve_site(app) as base:
        running, channel, stub = await started(settings(f"sqlite:///{tmp_path / 'v.db'}", tmp_path,
                                                        politeness=False))
        running.crawls.extraction = ExtractionPool(1, function=extract_or_die)
        try:
            await stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project()), metadata=A)
            final = await crawl_site(stub, base, "c1", "/crash", concurrency=4)
            pages = {urlsplit(p.url).path: p for p in await all_pages(stub, final.name)}
        finally:
            await channel.close()
            await running.stop()
    assert final.state == pb.JOB_STATE_SUCCEEDED
    assert pages["/crash"].error_reason == "EXTRACT_FAILED" and pages["/crash"].http_status == 200
    articles = [p for path, p in pages.items() if path.startswith("/articles/")]
    assert len(articles) == 6 and all(not p.error_reason and p.score.overall > 0 for p in articles)


async def test_a_page_whose_handling_raises_fails_with_a_reason_instead_of_being_fetched_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmo.visibility import crawl as crawl_module

    real_score = crawl_module.score_page

    def score_or_raise(extracted: Any, context: Any) -> Any:
        if extracted.url.endswith("/articles/3"):
            raise RuntimeError("a scoring bug")
        return real_score(extracted, context)

    monkeypatch.setattr(crawl_module, "score_page", score_or_raise)
    app = make_site(pages=5)
    async with serve_site(app) as base:
        running, channel, stub = await started(settings(f"sqlite:///{tmp_path / 'v.db'}", tmp_path,
                                                        politeness=False))
        try:
            await stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project()), metadata=A)
            final = await crawl_site(stub, base, "c1", concurrency=4)
            pages = {urlsplit(p.url).path: p for p in await all_pages(stub, final.name)}
        finally:
            await channel.close()
            await running.stop()
    assert final.state == pb.JOB_STATE_SUCCEEDED
    assert pages["/articles/3"].error_reason == "PROCESSING_FAILED"
    assert app["hits"]["/articles/3"] == 1
    assert all(not p.error_reason for path, p in pages.items() if path.startswith("/articles/") and path != "/articles/3")
