"""Crawls as long-running jobs: breadth-first over the project's domains, polite, SSRF-safe, resumable.

A crawl starts from its seeds and the sites' sitemaps; every URL found is normalised, checked against
the project's domains, include/exclude paths, depth and crawler-trap heuristics, and queued in the
store (`frontier`). Each queued URL is checked against robots.txt, fetched within the host's pace
(conditionally, with the ETag / Last-Modified of its previous version: a 304 keeps that version),
extracted, embedded and scored, and recorded with its links in one transaction. A restart resumes
RUNNING crawls from their frontier; a cancel stops after the fetches in flight. Every failure is per
page (`Page.error_reason`), never a dead crawl.

Before the first page, each of the project's third-party `mention_sources` is fetched once through the
same robots.txt check and host pacing (origins side by side, `SOURCES_IN_FLIGHT` at most); how many name
the brand is the `third_party_mentions` signal of every page the crawl scores (`third_party.py`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import email.utils
import hashlib
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from llmo.core.logging import get_logger
from llmo.core.outbox import Publisher
from llmo.core.resources import timestamp
from llmo.embedding import Embedder
from llmo.protos.events.v1 import events_pb2
from llmo.protos.visibility.v1 import visibility_service_pb2 as pb
from llmo.visibility import sitemaps, third_party, urls
from llmo.visibility.batching import EmbeddingBatcher, WriteBatcher
from llmo.visibility.convert import page_id, project_queries, score_proto, url_hash
from llmo.visibility.events import EventAnnouncer, event_row
from llmo.visibility.extract import ExtractedPage
from llmo.visibility.extract_pool import ExtractionFailed, ExtractionPool
from llmo.visibility.fetcher import Fetcher, FetchResult
from llmo.visibility.jobs import JobExecutor
from llmo.visibility.llms_txt import parse_llms_txt
from llmo.visibility.mentions import MentionDetector
from llmo.visibility.page_scores import BrandFacts, ScoringContext, score_page
from llmo.visibility.politeness import HostPacer
from llmo.visibility.robots import RobotsCache, RobotsRules
from llmo.visibility.settings import VisibilitySettings
from llmo.visibility.sov_runs import brands_of
from llmo.visibility.storage import (
    CANCELLED,
    FAILED,
    SUCCEEDED,
    FrontierUrl,
    PageOutcome,
    PageRow,
    UrlVersion,
    VisibilityStore,
)

log = get_logger(__name__)
DEFAULT_MAX_PAGES, DEFAULT_MAX_DEPTH, DEFAULT_RPS, DEFAULT_CONCURRENCY = 500, 5, 1.0, 1
HTML_TYPES = ("text/html", "application/xhtml+xml")
ATTEMPTED = ("fetched", "unchanged", "failed")  # outcomes that count against max_pages
CONTROL_INTERVAL_S = 0.5  # how often a running crawl reads its cancel flag
SOURCES_IN_FLIGHT = 8  # origins of mention sources read at once (each origin's sources one after another)


def merged_config(project: pb.CrawlConfig, requested: pb.CrawlConfig, user_agent: str) -> pb.CrawlConfig:
    """The request's config over the project's, with the contract's defaults for what neither sets."""
    config = pb.CrawlConfig()
    config.CopyFrom(project)
    for fd, value in requested.ListFields():
        if fd.is_repeated:
            getattr(config, fd.name)[:] = list(value)
        else:
            setattr(config, fd.name, value)
    config.max_pages = config.max_pages or DEFAULT_MAX_PAGES
    config.max_depth = config.max_depth or DEFAULT_MAX_DEPTH
    config.requests_per_second = config.requests_per_second or DEFAULT_RPS
    config.concurrency = config.concurrency or DEFAULT_CONCURRENCY
    config.user_agent = config.user_agent or user_agent
    return config


def brand_facts(project: pb.Project) -> BrandFacts:
    return BrandFacts(name=project.brand.name, aliases=list(project.brand.aliases),
                      description=project.brand.description, same_as=list(project.brand.same_as),
                      logo=project.brand.logo_url, domains=list(project.domains))


def query_similarity(query_vectors: np.ndarray, passage_vectors: np.ndarray) -> list[float]:
    """Per query, the cosine similarity of the page's best passage (0 for a page without passages)."""
    if not len(passage_vectors):
        return [0.0] * len(query_vectors)
    return [float(v) for v in (query_vectors @ passage_vectors.T).max(axis=1)]


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def http_date(value: str) -> datetime | None:
    if not value:
        return None
    with contextlib.suppress(TypeError, ValueError, IndexError):
        parsed = email.utils.parsedate_to_datetime(value)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def x_robots_noindex(headers: dict[str, str]) -> bool:
    value = headers.get("x-robots-tag", "").lower()
    # "googlebot: noindex" targets one crawler; a bare or "*"-scoped directive targets all.
    directives = [part.split(":", 1)[-1] for part in value.split(",")] if value else []
    return any("noindex" in d or "none" == d.strip() for d in directives)


class PacedFetcher:
    """A fetcher whose every request waits for its host's pace (robots.txt Crawl-delay included)."""

    def __init__(self, fetcher: Fetcher, pacer: HostPacer, robots: RobotsCache, user_agent: str) -> None:
        self.fetcher, self.pacer, self.robots, self.user_agent = fetcher, pacer, robots, user_agent

    async def fetch(self, url: str, **options: Any) -> FetchResult:
        host = urls.host_of(url)
        delay = (await self.robots.rules(url)).crawl_delay(self.user_agent)
        async with self.pacer.slot(host, delay):
            result = await self.fetcher.fetch(url, **options)
        self.pacer.observe(host, result.elapsed_s, result.status)
        return result


@dataclass
class CrawlPlan:
    """What one crawl execution needs, read once."""

    pk: int
    project_pk: int
    tenant: str
    name: str
    project: pb.Project
    config: pb.CrawlConfig
    seeds: list[str]
    query_vectors: np.ndarray  # (queries, 384)
    # Mention sources this crawl read before a restart (kept in its summary): not fetched again.
    sources_read: list[pb.MentionSource] = field(default_factory=list)


class CrawlExecutor(JobExecutor):
    """Executes PENDING and interrupted RUNNING crawls, `crawl_workers` at a time."""

    kind = "crawl"

    def __init__(self, store: VisibilityStore, settings: VisibilitySettings, fetcher: Fetcher, robots: RobotsCache,
                 embedder: Embedder, announcer: EventAnnouncer, publisher: Publisher | None = None,
                 extraction: ExtractionPool | None = None) -> None:
        super().__init__(settings.crawl_workers)
        self.store, self.settings, self.fetcher, self.robots = store, settings, fetcher, robots
        self.extraction = extraction or ExtractionPool(0)
        self.embedder, self.announcer, self.publisher = embedder, announcer, publisher
        self.batcher = EmbeddingBatcher(embedder)
        self._listeners: dict[int, list[asyncio.Queue[pb.Page | None]]] = {}

    def listen(self, crawl_pk: int) -> asyncio.Queue[pb.Page | None]:
        """A queue that receives each page the crawl records (and None when it ends)."""
        queue: asyncio.Queue[pb.Page | None] = asyncio.Queue(maxsize=1000)
        self._listeners.setdefault(crawl_pk, []).append(queue)
        return queue

    def unlisten(self, crawl_pk: int, queue: asyncio.Queue[pb.Page | None]) -> None:
        queues = self._listeners.get(crawl_pk, [])
        if queue in queues:
            queues.remove(queue)
        if not queues:
            self._listeners.pop(crawl_pk, None)

    def _notify(self, crawl_pk: int, page: pb.Page | None) -> None:
        for queue in self._listeners.get(crawl_pk, []):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(page)

    def runnable(self) -> list[int]:
        return self.store.runnable_crawls()

    def fail(self, pk: int, reason: str, message: str) -> None:
        self.store.finish_crawl(pk, FAILED, b"", reason, message)

    def ended(self, pk: int) -> None:
        self._notify(pk, None)

    async def close(self) -> None:
        """Stop starting fetches and let the ones in flight record their pages (a resumed crawl does not
        fetch them again), then cancel what still runs."""
        await super().close()
        await self.batcher.close()
        await self.extraction.close()

    async def _plan(self, pk: int) -> CrawlPlan | None:
        row = await asyncio.to_thread(self.store.crawl_by_pk, pk)
        if row is None:
            return None
        project_row = await asyncio.to_thread(self.store.project_by_pk, row.project_pk)
        if project_row is None:
            return None
        project = pb.Project.FromString(project_row.body)
        spec = pb.Crawl.FromString(row.spec)
        queries = [text for text, _ in project_queries(project)]
        vectors = await asyncio.to_thread(self.embedder.encode, queries)
        read = list(pb.CrawlSummary.FromString(row.summary).mention_sources) if row.summary else []
        return CrawlPlan(pk=pk, project_pk=row.project_pk, tenant=project_row.tenant,
                         name=f"projects/{project_row.project_id}/crawls/{row.crawl_id}", project=project,
                         config=spec.config, seeds=list(spec.seed_urls), query_vectors=vectors, sources_read=read)

    async def execute(self, pk: int) -> None:
        plan = await self._plan(pk)
        if plan is None:
            return
        await asyncio.to_thread(self.store.start_crawl, pk)
        config = plan.config
        pacer = HostPacer(requests_per_second=config.requests_per_second, concurrency=config.concurrency,
                          min_delay_s=self.settings.min_delay_s, polite=self.settings.politeness)
        site = await self._discover(plan, pacer)
        sources = await self._mention_sources(plan, pacer)
        site.update(mention_sources=sources, third_party_mentions=third_party.mentions_count(sources))
        # URLs being fetched, extracted and scored; then, apart, being written: a page waiting for its
        # batch's transaction does not hold one of the fetch slots. Both are kept out of frontier refills.
        in_flight: dict[str, asyncio.Task[PageOutcome]] = {}
        recording: dict[str, asyncio.Task[None]] = {}
        visiting: dict[str, FrontierUrl] = {}  # the frontier entry of each fetch in flight
        # Across hosts at most this many fetches run at once; each host is bounded by its pacer.
        width = max(1, config.concurrency) * max(1, len(plan.project.domains))
        row = await asyncio.to_thread(self.store.crawl_by_pk, pk)
        if row is None:
            return
        attempted = row.fetched + row.failed  # what counts against max_pages, kept here as pages finish
        queue: collections.deque[FrontierUrl] = collections.deque()
        # Pages finishing together are recorded in one transaction.
        writer: WriteBatcher[PageOutcome] = WriteBatcher(
            lambda outcomes: self.store.record_pages(pk, plan.project_pk, outcomes))
        cancelled = False
        checked = 0.0
        while True:
            if time.monotonic() - checked >= CONTROL_INTERVAL_S:
                control = await asyncio.to_thread(self.store.crawl_cancel_requested, pk)
                if control is None:  # the crawl was deleted under us
                    for task in [*in_flight.values(), *recording.values()]:
                        task.cancel()
                    await writer.close()
                    return
                if control:
                    cancelled = True
                    break
                checked = time.monotonic()
            if self.stopping:
                break
            budget = config.max_pages - attempted - len(in_flight)
            # Pages wait at most a few batches to be written: past that backlog no new fetch starts.
            while budget > 0 and len(in_flight) < width and len(recording) < 4 * width:
                if not queue:
                    queue.extend(await asyncio.to_thread(self.store.queued_urls, pk, max(4 * width, 64),
                                                         [*in_flight, *recording]))
                    if not queue:
                        break
                item = queue.popleft()
                if item.url_hash not in in_flight and item.url_hash not in recording:
                    in_flight[item.url_hash] = asyncio.create_task(self._fetch_and_score(plan, item, pacer, site))
                    visiting[item.url_hash] = item
                    budget -= 1
            if not in_flight and not recording:
                break
            done, _ = await asyncio.wait([*in_flight.values(), *recording.values()],
                                         return_when=asyncio.FIRST_COMPLETED, timeout=CONTROL_INTERVAL_S)
            for key in [k for k, task in recording.items() if task in done]:
                task = recording.pop(key)
                if task.exception() is not None:  # the URL stays queued in the frontier
                    log.error("page recording failed", crawl=plan.name, error=repr(task.exception()))
            for key in [k for k, fetching in in_flight.items() if fetching in done]:
                fetching, item = in_flight.pop(key), visiting.pop(key)
                error = fetching.exception()
                if error is not None:  # a bug, not the page: it fails with a reason instead of coming back
                    log.error("page processing failed", crawl=plan.name, url=item.url, error=repr(error))
                    outcome = self._failed(plan, item, FetchResult(url=item.url, final_url=item.url,
                                                                   error_reason="PROCESSING_FAILED",
                                                                   error_message=repr(error)))
                else:
                    outcome = fetching.result()
                if outcome.outcome in ATTEMPTED:
                    attempted += 1
                recording[key] = asyncio.create_task(self._record(plan, outcome, writer))
        if in_flight or recording:
            await asyncio.gather(*in_flight.values(), return_exceptions=True)
            for key, fetching in in_flight.items():  # fetched while stopping: record them, they are done
                if not fetching.cancelled() and fetching.exception() is None:
                    recording[key] = asyncio.create_task(self._record(plan, fetching.result(), writer))
            await asyncio.gather(*recording.values(), return_exceptions=True)
        await writer.close()
        if self.stopping and not cancelled:
            return  # the service is stopping: the crawl stays RUNNING and resumes on the next start
        if not cancelled:
            await asyncio.to_thread(self.store.skip_queued, pk)  # page limit reached: the rest is not fetched
        await self._finish(plan, site, CANCELLED if cancelled else SUCCEEDED)

    async def _discover(self, plan: CrawlPlan, pacer: HostPacer) -> dict[str, Any]:
        """Sitemaps, robots.txt facts and llms.txt of the project's origins; sitemap URLs are queued.
        Every request is paced like a page fetch: the host sees one rate, discovery included."""
        paced = PacedFetcher(self.fetcher, pacer, self.robots, plan.config.user_agent)
        origins = sorted({origin_of(u) for u in plan.seeds})
        lastmod: dict[str, datetime] = {}
        blocked: set[str] = set()
        llms_found = False
        roots: list[str] = []
        for origin in origins:
            async with pacer.slot(urls.host_of(origin + "/")):
                rules = await self.robots.rules(origin + "/")
            blocked.update(rules.ai_bots_blocked())
            roots.extend(rules.sitemaps() or [origin + "/sitemap.xml"])
            llms = await paced.fetch(origin + "/llms.txt", accept=())
            if llms.ok and llms.status == 200 and parse_llms_txt(llms.text).title:
                llms_found = True
        entries = await sitemaps.discover(paced, roots, max_urls=max(plan.config.max_pages * 4, 100))
        queued: list[tuple[str, str, int]] = []
        for entry in entries:
            url = urls.normalize_url(entry.loc)
            if url is None or not self._wanted(plan, url):
                continue
            if entry.lastmod is not None:
                lastmod[url] = entry.lastmod
            queued.append((url_hash(url), url, 1))
        if queued:
            await asyncio.to_thread(self.store.add_urls, plan.pk, queued)
        return {"lastmod": lastmod, "ai_bots_blocked": sorted(blocked), "llms_txt": llms_found}

    async def _mention_sources(self, plan: CrawlPlan, pacer: HostPacer) -> list[pb.MentionSource]:
        """Each distinct mention source read once, in the project's order; kept in the crawl's summary at
        once, so that WatchCrawl shows them and a resumed crawl does not fetch them again."""
        wanted = third_party.distinct_sources(plan.project.mention_sources)
        if not wanted:
            return []
        if [s.url for s in plan.sources_read] == wanted:
            return list(plan.sources_read)
        paced = PacedFetcher(self.fetcher, pacer, self.robots, plan.config.user_agent)
        detector = MentionDetector(brands_of(plan.project))
        by_origin: dict[str, list[str]] = {}
        for url in wanted:
            by_origin.setdefault(origin_of(url), []).append(url)
        gate = asyncio.Semaphore(SOURCES_IN_FLIGHT)
        read: dict[str, pb.MentionSource] = {}

        async def read_origin(origin: str, group: list[str]) -> None:
            async with gate:
                rules: RobotsRules | None = None
                for url in group:
                    try:
                        if rules is None:
                            async with pacer.slot(urls.host_of(origin + "/")):  # paced like any request
                                rules = await self.robots.rules(origin + "/")
                        read[url] = await self._mention_source(plan, paced, rules, detector, url)
                    except Exception as exc:  # a bug, not the source: that source fails, never the crawl
                        log.error("mention source processing failed", crawl=plan.name, url=url, error=repr(exc))
                        read[url] = pb.MentionSource(url=url, error_reason="PROCESSING_FAILED")

        await asyncio.gather(*(read_origin(origin, group) for origin, group in by_origin.items()))
        sources = [read[url] for url in wanted]
        summary = pb.CrawlSummary(mention_sources=sources, third_party_mentions=third_party.mentions_count(sources) or 0)
        await asyncio.to_thread(self.store.set_crawl_summary, plan.pk, summary.SerializeToString())
        log.info("mention sources read", crawl=plan.name, sources=len(sources),
                 naming_brand=summary.third_party_mentions)
        return sources

    async def _mention_source(self, plan: CrawlPlan, paced: PacedFetcher, rules: RobotsRules,
                              detector: MentionDetector, url: str) -> pb.MentionSource:
        if rules.status == "unreachable":  # RFC 9309: nothing may be fetched; say why, it is not the site's rule
            return pb.MentionSource(url=url, error_reason="ROBOTS_UNREACHABLE")
        if not rules.allowed(url, plan.config.user_agent):
            return pb.MentionSource(url=url, error_reason="ROBOTS_DISALLOWED")
        result = await paced.fetch(url)
        if result.error_reason is not None:
            return pb.MentionSource(url=url, http_status=result.status, error_reason=result.error_reason)
        if urls.in_domains(result.final_url, plan.project.domains):  # it redirected to the brand's own site
            return pb.MentionSource(url=url, http_status=result.status, error_reason="OWN_DOMAIN")
        try:
            extracted = await self.extraction.extract(result.body, result.final_url)
        except ExtractionFailed:
            return pb.MentionSource(url=url, http_status=result.status, error_reason="EXTRACT_FAILED")
        text = "\n".join(part for part in (extracted.title, extracted.main_text) if part)
        source = await asyncio.to_thread(third_party.read_source, url, text, detector, plan.project.brand.name)
        source.http_status = result.status
        return source

    def _wanted(self, plan: CrawlPlan, url: str) -> bool:
        if not urls.in_domains(url, plan.project.domains):
            return False
        path = url.split("://", 1)[-1].split("/", 1)
        path_only = "/" + (path[1] if len(path) > 1 else "")
        if plan.config.include_paths and not any(path_only.startswith(p) for p in plan.config.include_paths):
            return False
        return not any(path_only.startswith(p) for p in plan.config.exclude_paths)

    async def _record(self, plan: CrawlPlan, outcome: PageOutcome, writer: WriteBatcher[PageOutcome]) -> None:
        await writer.submit(outcome)
        if outcome.page is not None and self._listeners.get(plan.pk):
            self._notify(plan.pk, pb.Page.FromString(outcome.page.body))

    async def _fetch_and_score(self, plan: CrawlPlan, item: FrontierUrl, pacer: HostPacer,
                               site: dict[str, Any]) -> PageOutcome:
        if urls.trap_reason(item.url) is not None:
            return PageOutcome(url_hash=item.url_hash, outcome="trapped")
        agent = plan.config.user_agent
        rules = await self.robots.rules(item.url)
        if not rules.allowed(item.url, agent):
            return PageOutcome(url_hash=item.url_hash, outcome="disallowed")
        previous = await asyncio.to_thread(self.store.url_version, plan.project_pk, item.url_hash)
        host = urls.host_of(item.url)
        async with pacer.slot(host, rules.crawl_delay(agent)):
            result = await self.fetcher.fetch(item.url, etag=previous.etag or None if previous else None,
                                              last_modified=previous.last_modified or None if previous else None)
        pacer.observe(host, result.elapsed_s, result.status)
        if result.not_modified and previous is not None:
            kept = await self._unchanged(plan, item, previous, site)
            if kept is not None:
                return kept
            # Unchanged, but scored with another third-party count: fetch it whole to score it again.
            async with pacer.slot(host, rules.crawl_delay(agent)):
                result = await self.fetcher.fetch(item.url)
            pacer.observe(host, result.elapsed_s, result.status)
        if result.error_reason is not None:
            return self._failed(plan, item, result)
        return await self._scored(plan, item, result, site, previous)

    async def _unchanged(self, plan: CrawlPlan, item: FrontierUrl, previous: UrlVersion,
                         site: dict[str, Any]) -> PageOutcome | None:
        """The previous version kept; None when its score counted another number of third-party mentions."""
        old = await asyncio.to_thread(self.store.get_page, previous.crawl_pk, previous.page_id)
        if old is None:  # the old crawl was deleted with its pages: nothing to keep, count it as failed
            return PageOutcome(url_hash=item.url_hash, outcome="failed")
        page = pb.Page.FromString(old.body)
        if scored_mentions(page) != site.get("third_party_mentions"):
            return None
        page.not_modified = True
        page.fetch_time.CopyFrom(timestamp(_now_us()))
        page.name = f"{plan.name}/pages/{previous.page_id}"
        row = PageRow(crawl_pk=plan.pk, page_id=previous.page_id, url=page.url, overall=old.overall, failed=False,
                      body=page.SerializeToString(), passages=old.passages, embeddings=old.embeddings,
                      entity=old.entity, fetch_us=_now_us())
        version = UrlVersion(url_hash=item.url_hash, url=item.url, version=previous.version,
                             content_hash=previous.content_hash, etag=previous.etag,
                             last_modified=previous.last_modified, crawl_pk=plan.pk, page_id=previous.page_id)
        return PageOutcome(url_hash=item.url_hash, outcome="unchanged", page=row, version=version)

    def _failed(self, plan: CrawlPlan, item: FrontierUrl, result: FetchResult) -> PageOutcome:
        pid = page_id(item.url)
        page = pb.Page(name=f"{plan.name}/pages/{pid}", url=item.url, canonical_url=result.final_url or item.url,
                       http_status=result.status, depth=item.depth, content_bytes=len(result.body),
                       error_reason=result.error_reason or "FETCH_FAILED")
        page.fetch_time.CopyFrom(timestamp(_now_us()))
        row = PageRow(crawl_pk=plan.pk, page_id=pid, url=item.url, overall=0.0, failed=True,
                      body=page.SerializeToString(), passages=[], embeddings=b"", entity={}, fetch_us=_now_us())
        return PageOutcome(url_hash=item.url_hash, outcome="failed", page=row)

    async def _scored(self, plan: CrawlPlan, item: FrontierUrl, result: FetchResult, site: dict[str, Any],
                      previous: UrlVersion | None) -> PageOutcome:
        try:
            extracted = await self.extraction.extract(result.body, result.final_url)
        except ExtractionFailed as exc:
            return self._failed(plan, item, dataclasses.replace(result, error_reason="EXTRACT_FAILED",
                                                                error_message=str(exc)))
        noindex = extracted.noindex or x_robots_noindex(result.headers)
        canonical = urls.normalize_url(extracted.canonical_url or "", result.final_url) if extracted.canonical_url \
            else None
        if canonical is None or not urls.in_domains(canonical, plan.project.domains):
            canonical = urls.normalize_url(result.final_url) or item.url
        # Without tracked queries nothing needs the vectors now; coverage gaps embed what they read later.
        vectors = await self.batcher.encode(extracted.passages) if len(plan.query_vectors) else None
        similarity = None if vectors is None else query_similarity(plan.query_vectors, vectors)
        rules = await self.robots.rules(item.url)
        context = ScoringContext(
            brand=brand_facts(plan.project), prompt_similarity=similarity,
            sitemap_lastmod=site["lastmod"].get(item.url), http_last_modified=http_date(
                result.headers.get("last-modified", "")),
            noindex=noindex, ai_bots_blocked=rules.answer_crawlers_blocked(item.url), http_status=result.status,
            third_party_mentions=site.get("third_party_mentions"))
        score = await asyncio.to_thread(score_page, extracted, context)
        pid = page_id(canonical)
        content_hash = hashlib.sha256(extracted.main_text.encode()).hexdigest()
        version_number = 1 if previous is None else previous.version + (previous.content_hash != content_hash)
        page = page_proto(extracted, result, item, score_proto(score), noindex=noindex, canonical=canonical,
                          name=f"{plan.name}/pages/{pid}", content_hash=content_hash, version=version_number,
                          sitemap_lastmod=site["lastmod"].get(item.url))
        row = PageRow(crawl_pk=plan.pk, page_id=pid, url=item.url, overall=page.score.overall, failed=False,
                      body=page.SerializeToString(), passages=list(extracted.passages),
                      embeddings=b"" if vectors is None else np.asarray(vectors, dtype=np.float32).tobytes(),
                      entity={"organization": _jsonable(extracted.organization)}, fetch_us=_now_us())
        version = UrlVersion(url_hash=item.url_hash, url=item.url, version=version_number, content_hash=content_hash,
                             etag=result.headers.get("etag", ""), last_modified=result.headers.get("last-modified", ""),
                             crawl_pk=plan.pk, page_id=pid)
        links: list[tuple[str, str, int]] = []
        if not extracted.nofollow and item.depth < plan.config.max_depth:
            for link in extracted.links:
                if "nofollow" in link.rel.lower():
                    continue
                url = urls.normalize_url(link.url, result.final_url)
                if url is not None and self._wanted(plan, url):
                    links.append((url_hash(url), url, item.depth + 1))
        if canonical != item.url and self._wanted(plan, canonical):
            links.append((url_hash(canonical), canonical, item.depth))
        return PageOutcome(url_hash=item.url_hash, outcome="fetched", page=row, version=version, links=links)

    async def _finish(self, plan: CrawlPlan, site: dict[str, Any], state: int) -> None:
        rows = await asyncio.to_thread(self.store.crawl_pages, plan.pk)
        summary = crawl_summary(rows, site)
        crawl = await asyncio.to_thread(self.store.crawl_by_pk, plan.pk)
        event = None
        if crawl is not None:
            event = event_row(events_pb2.CrawlCompleted(
                event_id=f"crawl_completed/{plan.tenant}/{plan.name}", occurred_at=timestamp(_now_us()),
                crawl=plan.name, pages_fetched=crawl.fetched, pages_failed=crawl.failed, tenant=plan.tenant,
                state=pb.JobState.Name(state), mean_score=summary.mean_overall))  # type: ignore[arg-type]
        await asyncio.to_thread(self.store.finish_crawl, plan.pk, state, summary.SerializeToString(), "", "", event)
        self.announcer.wake()
        log.info("crawl finished", crawl=plan.name, state=pb.JobState.Name(state),  # type: ignore[arg-type]
                 pages=len(rows))


def crawl_summary(rows: Sequence[PageRow], site: dict[str, Any]) -> pb.CrawlSummary:
    scored = [pb.Page.FromString(r.body) for r in rows if not r.failed]
    sources = list(site.get("mention_sources", []))
    summary = pb.CrawlSummary(llms_txt_found=bool(site.get("llms_txt")),
                              ai_bots_blocked=list(site.get("ai_bots_blocked", [])), mention_sources=sources,
                              third_party_mentions=third_party.mentions_count(sources) or 0)
    if not scored:
        return summary
    n = len(scored)
    summary.mean_overall = round(sum(p.score.overall for p in scored) / n, 3)
    for name in ("authority", "clarity", "quality"):
        setattr(summary.mean_pillars, name, round(sum(getattr(p.score.pillars, name) for p in scored) / n, 3))
    relevant = [p for p in scored if p.score.pillars.relevance_applicable]
    if relevant:
        summary.mean_pillars.relevance_applicable = True
        summary.mean_pillars.relevance = round(sum(p.score.pillars.relevance for p in relevant) / len(relevant), 3)
    codes = Counter(f.code for p in scored for f in p.score.findings)
    summary.top_finding_codes[:] = [code for code, _ in codes.most_common(10)]
    return summary


def scored_mentions(page: pb.Page) -> int | None:
    """The third-party mention count a stored page was scored with (None: the signal was left out)."""
    value = next((s.value for s in page.score.signals if s.name == "third_party_mentions"), None)
    return None if value is None else int(value)


def page_proto(extracted: ExtractedPage, result: FetchResult, item: FrontierUrl, score: pb.PageScore, *,
               noindex: bool, canonical: str, name: str, content_hash: str, version: int,
               sitemap_lastmod: datetime | None) -> pb.Page:
    page = pb.Page(name=name, url=item.url, canonical_url=canonical, http_status=result.status,
                   title=extracted.title[:1000], depth=item.depth, content_bytes=len(result.body),
                   word_count=extracted.word_count, schema_types=list(extracted.schema_types), score=score,
                   noindex=noindex, content_hash=content_hash, version=version, main_text=extracted.main_text)
    page.fetch_time.CopyFrom(timestamp(_now_us()))
    if sitemap_lastmod is not None:
        page.sitemap_lastmod.FromDatetime(sitemap_lastmod.astimezone(UTC).replace(tzinfo=None))
    return page


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _now_us() -> int:
    return time.time_ns() // 1000


def new_crawl_id() -> str:
    return uuid.uuid4().hex[:32]
