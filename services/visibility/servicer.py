"""gRPC servicer of llmo.visibility.v1.VisibilityService.

Every project belongs to the calling tenant (`llmo.core.context.current_tenant()`); another tenant's
project, with everything under it, is NOT_FOUND, never FORBIDDEN, so ids do not leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import numpy as np

from llmo.core import context as ctx
from llmo.core.errors import (
    ServiceError,
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    resource_exhausted,
    unavailable,
)
from llmo.core.limits import preview
from llmo.core.pagination import decode_page_token, encode_page_token, page_size
from llmo.core.resources import page_after, parse_name, resource_id, timestamp
from llmo.embedding import Embedder
from llmo.protos.visibility.v1 import visibility_service_pb2 as pb
from llmo.protos.visibility.v1 import visibility_service_pb2_grpc as pb_grpc
from llmo.visibility import urls
from llmo.visibility.convert import (
    crawl_proto,
    new_etag,
    project_proto,
    project_queries,
    run_proto,
    score_proto,
    url_hash,
)
from llmo.visibility.crawl import (
    CrawlExecutor,
    brand_facts,
    http_date,
    merged_config,
    new_crawl_id,
    query_similarity,
    x_robots_noindex,
)
from llmo.visibility.entity import PageEntity, consistency_report
from llmo.visibility.extract import extract_page
from llmo.visibility.fetcher import Fetcher
from llmo.visibility.gaps import Passages, coverage_gaps
from llmo.visibility.page_scores import ScoringContext, score_page
from llmo.visibility.referrals import classify_crawler, classify_referral
from llmo.visibility.robots import RobotsCache
from llmo.visibility.settings import DEFAULT_USER_AGENT, VisibilitySettings
from llmo.visibility.sov_runs import (
    EngineRef,
    RunExecutor,
    brands_from_json,
    brands_json,
    brands_of,
    to_answers,
)
from llmo.visibility.sov_stats import brand_metrics
from llmo.visibility.storage import (
    ACTIVE_STATES,
    AlreadyExists,
    AlreadyRunning,
    CrawlRow,
    EtagMismatch,
    JobsActive,
    ProjectRow,
    RunRow,
    TooManyActive,
    VisibilityStore,
    VisitRow,
    now_us,
)
from llmo.visibility.traffic import bucket_start_us, referral_report
from llmo.visibility.validate import check_crawl_config, check_http_url, check_project

PROJECT_FIELDS = ("display_name", "brand", "domains", "competitors", "tracked_queries", "queries", "default_engines",
                  "engines", "crawl_config", "labels", "mention_sources")
MAX_VISITS = 10_000
WATCH_INTERVAL_S = 0.1  # at most ten crawl snapshots a second per watcher
MAX_HTML_BYTES = 5 * 2**20
MAX_SEEDS = 100
MAX_RUN_QUERIES = 1000


def _tenant() -> str:
    return ctx.current_tenant() or ""


def _etag_mismatch() -> ServiceError:
    return ServiceError(grpc.StatusCode.ABORTED, "ETAG_MISMATCH", "the project changed since it was read; read it again")


def _stable_body(project: pb.Project) -> bytes:
    body = pb.Project()
    body.CopyFrom(project)
    for name in ("name", "etag", "create_time", "update_time", "query_set_version"):
        body.ClearField(name)
    return body.SerializeToString(deterministic=True)


def _us(stamp: Any) -> int:
    return int(stamp.seconds) * 1_000_000 + int(stamp.nanos) // 1000


class VisibilityServicer(pb_grpc.VisibilityServiceServicer):
    def __init__(self, store: VisibilityStore, settings: VisibilitySettings, crawls: CrawlExecutor,
                 runs: RunExecutor, fetcher: Fetcher, robots: RobotsCache, embedder: Embedder,
                 router_models: Any = None) -> None:
        self.store, self.settings, self.crawls, self.runs = store, settings, crawls, runs
        self.fetcher, self.robots, self.embedder = fetcher, robots, embedder
        # async () -> set[str] | None: the models the router lists (None when it cannot be asked).
        self.router_models = router_models

    # --- projects ------------------------------------------------------------------------------

    async def _project(self, name: str, field: str = "name") -> ProjectRow:
        (project_id,) = parse_name(name, "projects")
        row = await asyncio.to_thread(self.store.get_project, _tenant(), project_id)
        if row is None:
            raise not_found("PROJECT_NOT_FOUND", f"no project {project_id!r}", project=project_id)
        return row

    async def CreateProject(self, request: pb.CreateProjectRequest,
                            context: grpc.aio.ServicerContext) -> pb.CreateProjectResponse:
        project_id = resource_id(request.project_id, "INVALID_PROJECT_ID", "project_id")
        check_project(request.project)
        stamp = now_us()
        row = ProjectRow(0, _tenant(), project_id, _stable_body(request.project), new_etag(), 1,
                         request.request_id[:128], stamp, stamp)
        try:
            row = await asyncio.to_thread(self.store.create_project, row)
        except AlreadyExists:
            raise already_exists("PROJECT_ALREADY_EXISTS", f"project {project_id!r} exists",
                                 project=project_id) from None
        return pb.CreateProjectResponse(project=project_proto(row))

    async def GetProject(self, request: pb.GetProjectRequest, context: grpc.aio.ServicerContext) -> pb.GetProjectResponse:
        return pb.GetProjectResponse(project=project_proto(await self._project(request.name)))

    async def ListProjects(self, request: pb.ListProjectsRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListProjectsResponse:
        limit = page_size(request.page_size)
        after = page_after(request.page_token)
        rows = await asyncio.to_thread(self.store.list_projects, _tenant(), after, limit)
        token = encode_page_token({"after": rows[-1].project_id}) if len(rows) == limit else ""
        return pb.ListProjectsResponse(projects=[project_proto(r) for r in rows], next_page_token=token)

    async def UpdateProject(self, request: pb.UpdateProjectRequest,
                            context: grpc.aio.ServicerContext) -> pb.UpdateProjectResponse:
        row = await self._project(request.project.name)
        paths = list(request.update_mask.paths) or list(PROJECT_FIELDS)
        unknown = [p for p in paths if p not in PROJECT_FIELDS]
        if unknown:
            raise invalid_argument("INVALID_UPDATE_MASK", f"cannot update {preview(unknown[0])!r}; updatable: "
                                   f"{', '.join(PROJECT_FIELDS)}", field=preview(unknown[0]))
        current = pb.Project.FromString(row.body)
        updated = pb.Project()
        updated.CopyFrom(current)
        for path in paths:
            updated.ClearField(path)
            value = getattr(request.project, path)
            if hasattr(value, "CopyFrom"):
                getattr(updated, path).CopyFrom(value)
            elif hasattr(value, "extend"):
                getattr(updated, path).extend(value)
            elif hasattr(value, "update"):
                getattr(updated, path).update(value)
            else:
                setattr(updated, path, value)
        check_project(updated)
        queries_changed = project_queries(updated) != project_queries(current)
        try:
            saved = await asyncio.to_thread(self.store.update_project, row.tenant, row.project_id,
                                            _stable_body(updated), request.project.etag, new_etag(), queries_changed)
        except EtagMismatch:
            raise _etag_mismatch() from None
        if saved is None:
            raise not_found("PROJECT_NOT_FOUND", f"no project {row.project_id!r}", project=row.project_id)
        return pb.UpdateProjectResponse(project=project_proto(saved))

    async def DeleteProject(self, request: pb.DeleteProjectRequest,
                            context: grpc.aio.ServicerContext) -> pb.DeleteProjectResponse:
        row = await self._project(request.name)
        try:
            deleted = await asyncio.to_thread(self.store.delete_project, row.tenant, row.project_id, request.etag)
        except EtagMismatch:
            raise _etag_mismatch() from None
        except JobsActive:
            raise failed_precondition("JOBS_ACTIVE", "a crawl or share-of-voice run of the project is PENDING or "
                                      "RUNNING; cancel it first", project=row.project_id) from None
        if not deleted:
            raise not_found("PROJECT_NOT_FOUND", f"no project {row.project_id!r}", project=row.project_id)
        return pb.DeleteProjectResponse()

    # --- crawls --------------------------------------------------------------------------------

    async def _crawl(self, name: str) -> tuple[ProjectRow, CrawlRow]:
        project_id, crawl_id = parse_name(name, "projects", "crawls")
        project = await self._project(f"projects/{project_id}")
        crawl = await asyncio.to_thread(self.store.get_crawl, project.pk, crawl_id)
        if crawl is None:
            raise not_found("CRAWL_NOT_FOUND", f"no crawl {crawl_id!r} in project {project_id!r}", crawl=crawl_id)
        return project, crawl

    async def StartCrawl(self, request: pb.StartCrawlRequest, context: grpc.aio.ServicerContext) -> pb.StartCrawlResponse:
        project_row = await self._project(request.parent, "parent")
        crawl_id = resource_id(request.crawl_id, "INVALID_CRAWL_ID", "crawl_id") if request.crawl_id \
            else new_crawl_id()
        project = pb.Project.FromString(project_row.body)
        check_crawl_config(request.crawl.config, "crawl.config")
        if len(request.crawl.seed_urls) > MAX_SEEDS:
            raise invalid_argument("INVALID_SEED_URL", f"at most {MAX_SEEDS} seed URLs", field="crawl.seed_urls")
        seeds: list[str] = []
        for i, seed in enumerate(request.crawl.seed_urls):
            check_http_url(seed, f"crawl.seed_urls[{i}]", "INVALID_SEED_URL")
            normal = urls.normalize_url(seed)
            if normal is None or not urls.in_domains(normal, project.domains):
                raise invalid_argument("INVALID_SEED_URL", f"crawl.seed_urls[{i}] is outside the project's domains "
                                       f"({', '.join(project.domains)})", field=f"crawl.seed_urls[{i}]")
            seeds.append(normal)
        if not seeds:
            seeds = [f"https://{domain}/" for domain in project.domains]
        spec = pb.Crawl(seed_urls=seeds, config=merged_config(project.crawl_config, request.crawl.config,
                                                              DEFAULT_USER_AGENT))
        row = CrawlRow(0, project_row.pk, crawl_id, spec.SerializeToString(), 1, 0, 0, 0, 0, 0, 0, b"", "", "", False,
                       request.request_id[:128], now_us(), 0, 0)
        try:
            row = await asyncio.to_thread(self.store.create_crawl, row, [(url_hash(s), s, 0) for s in seeds])
        except AlreadyExists:
            raise already_exists("CRAWL_ALREADY_EXISTS", f"crawl {crawl_id!r} exists", crawl=crawl_id) from None
        except AlreadyRunning:
            raise failed_precondition("CRAWL_ALREADY_RUNNING", "the project has a PENDING or RUNNING crawl; wait for "
                                      "it or cancel it", project=project_row.project_id) from None
        self.crawls.wake()
        return pb.StartCrawlResponse(crawl=crawl_proto(row, project_row.project_id))

    async def GetCrawl(self, request: pb.GetCrawlRequest, context: grpc.aio.ServicerContext) -> pb.GetCrawlResponse:
        project, crawl = await self._crawl(request.name)
        return pb.GetCrawlResponse(crawl=crawl_proto(crawl, project.project_id))

    async def ListCrawls(self, request: pb.ListCrawlsRequest, context: grpc.aio.ServicerContext) -> pb.ListCrawlsResponse:
        project = await self._project(request.parent, "parent")
        limit = page_size(request.page_size)
        before = _before(request.page_token, request.parent)
        rows = await asyncio.to_thread(self.store.list_crawls, project.pk, before, limit)
        token = encode_page_token({"t": rows[-1].create_us, "id": rows[-1].crawl_id}, query=request.parent) \
            if len(rows) == limit else ""
        return pb.ListCrawlsResponse(crawls=[crawl_proto(r, project.project_id) for r in rows], next_page_token=token)

    async def WatchCrawl(self, request: pb.WatchCrawlRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchCrawlResponse]:
        project, crawl = await self._crawl(request.name)
        queue = self.crawls.listen(crawl.pk)
        try:
            yield pb.WatchCrawlResponse(crawl=crawl_proto(crawl, project.project_id))
            sent = time.monotonic()
            while crawl.state in ACTIVE_STATES:
                page = None
                with contextlib.suppress(TimeoutError):
                    page = await asyncio.wait_for(queue.get(), timeout=1.0)  # other replicas: poll
                # Pages recorded within one interval make one snapshot, with the last of them.
                await asyncio.sleep(max(0.0, sent + WATCH_INTERVAL_S - time.monotonic()))
                while not queue.empty():
                    page = queue.get_nowait() or page
                sent = time.monotonic()
                fresh = await asyncio.to_thread(self.store.crawl_by_pk, crawl.pk)
                if fresh is None:
                    return
                changed = page is not None or (fresh.fetched, fresh.failed, fresh.state) != (
                    crawl.fetched, crawl.failed, crawl.state)
                crawl = fresh
                if changed:
                    response = pb.WatchCrawlResponse(crawl=crawl_proto(crawl, project.project_id))
                    if page is not None:
                        page.main_text = ""
                        response.latest_page.CopyFrom(page)
                    yield response
        finally:
            self.crawls.unlisten(crawl.pk, queue)

    async def CancelCrawl(self, request: pb.CancelCrawlRequest, context: grpc.aio.ServicerContext) -> pb.CancelCrawlResponse:
        project, crawl = await self._crawl(request.name)
        if crawl.state in ACTIVE_STATES:
            await asyncio.to_thread(self.store.request_crawl_cancel, crawl.pk)
            fresh = await asyncio.to_thread(self.store.crawl_by_pk, crawl.pk)
            crawl = fresh if fresh is not None else crawl
        return pb.CancelCrawlResponse(crawl=crawl_proto(crawl, project.project_id))

    async def GetPage(self, request: pb.GetPageRequest, context: grpc.aio.ServicerContext) -> pb.GetPageResponse:
        project_id, crawl_id, pid = _page_name(request.name)
        _, crawl = await self._crawl(f"projects/{project_id}/crawls/{crawl_id}")
        row = await asyncio.to_thread(self.store.get_page, crawl.pk, pid)
        if row is None:
            raise not_found("PAGE_NOT_FOUND", f"no page {pid!r} in crawl {crawl_id!r}", page=pid)
        return pb.GetPageResponse(page=pb.Page.FromString(row.body))

    async def ListPages(self, request: pb.ListPagesRequest, context: grpc.aio.ServicerContext) -> pb.ListPagesResponse:
        _, crawl = await self._crawl(request.parent)
        limit = page_size(request.page_size)
        order = {pb.PAGE_ORDER_SCORE_ASCENDING: "score_asc", pb.PAGE_ORDER_SCORE_DESCENDING: "score_desc"}.get(
            request.order_by, "url")
        query = f"{request.parent}|{order}"
        position = decode_page_token(request.page_token, query=query)
        after = None
        if position is not None:
            key, pid = position.get("k"), position.get("id")
            if not isinstance(pid, str) or not isinstance(key, (str, int, float)):
                raise invalid_argument("INVALID_PAGE_TOKEN", "page_token is malformed or belongs to another query")
            after = (key, pid)
        rows = await asyncio.to_thread(self.store.list_pages, crawl.pk, order, after, limit)
        token = ""
        if len(rows) == limit:
            last = rows[-1]
            token = encode_page_token({"k": last.url if order == "url" else last.overall, "id": last.page_id},
                                      query=query)
        pages = []
        for row in rows:
            page = pb.Page.FromString(row.body)
            page.main_text = ""
            pages.append(page)
        return pb.ListPagesResponse(pages=pages, next_page_token=token)

    async def ScorePage(self, request: pb.ScorePageRequest, context: grpc.aio.ServicerContext) -> pb.ScorePageResponse:
        project = None
        third_party_mentions = None  # not counted unless the project's latest succeeded crawl read its sources
        if request.project:
            project_row = await self._project(request.project, "project")
            project = pb.Project.FromString(project_row.body)
            latest = await asyncio.to_thread(self.store.latest_succeeded_crawl, project_row.pk)
            if latest is not None and latest.summary:
                summary = pb.CrawlSummary.FromString(latest.summary)
                if summary.mention_sources:
                    third_party_mentions = summary.third_party_mentions
        source = request.WhichOneof("source")
        if source is None or (source == "url" and not request.url) or (source == "html" and not request.html):
            raise invalid_argument("MISSING_PAGE_SOURCE", "set url or html", field="source")
        status, headers, url = 200, {}, request.base_url or "https://page.invalid/"
        if source == "html":
            if len(request.html.encode("utf-8", "replace")) > MAX_HTML_BYTES:
                raise invalid_argument("PAGE_TOO_LARGE", "html is larger than 5 MiB", field="html")
            if request.base_url:
                check_http_url(request.base_url, "base_url", "INVALID_URL")
            body: bytes | str = request.html
            blocked: list[str] = []
        else:
            check_http_url(request.url, "url", "INVALID_URL")
            url = request.url
            rules = await self.robots.rules(url)
            agent = DEFAULT_USER_AGENT
            if not rules.allowed(url, agent):
                raise failed_precondition("ROBOTS_DISALLOWED", f"robots.txt forbids fetching {preview(url)!r}",
                                          url=preview(url))
            result = await self.fetcher.fetch(url)
            if result.error_reason is not None:
                raise unavailable("FETCH_FAILED", f"fetching {preview(url)!r} failed: {result.error_reason} "
                                  f"{preview(result.error_message)}", url=preview(url), cause=result.error_reason)
            body, status, headers, url = result.body, result.status, result.headers, result.final_url
            blocked = rules.answer_crawlers_blocked(url)
        extracted = await asyncio.to_thread(extract_page, body, url)
        similarity = None
        if project is not None:
            queries = [text for text, _ in project_queries(project)]
            if queries:
                qv = await asyncio.to_thread(self.embedder.encode, queries)
                pv = await asyncio.to_thread(self.embedder.encode, extracted.passages)
                similarity = query_similarity(qv, pv)
        noindex = extracted.noindex or x_robots_noindex(headers)
        scoring = ScoringContext(brand=brand_facts(project) if project is not None else None,
                                 prompt_similarity=similarity, noindex=noindex, ai_bots_blocked=blocked,
                                 third_party_mentions=third_party_mentions,
                                 http_status=status, http_last_modified=http_date(headers.get("last-modified", "")))
        score = await asyncio.to_thread(score_page, extracted, scoring)
        page = pb.Page(url=url, canonical_url=extracted.canonical_url or url, http_status=status,
                       title=extracted.title[:1000], content_bytes=len(body if isinstance(body, bytes) else
                                                                       body.encode()),
                       word_count=extracted.word_count, schema_types=list(extracted.schema_types),
                       score=score_proto(score), noindex=noindex,
                       content_hash=hashlib.sha256(extracted.main_text.encode()).hexdigest(),
                       main_text=extracted.main_text)
        page.fetch_time.CopyFrom(timestamp(now_us()))
        return pb.ScorePageResponse(page=page)

    async def GetEntityConsistency(self, request: pb.GetEntityConsistencyRequest,
                                   context: grpc.aio.ServicerContext) -> pb.GetEntityConsistencyResponse:
        project_row = await self._project(request.project, "project")
        if request.crawl:
            project_id, _ = parse_name(request.crawl, "projects", "crawls")
            if project_id != project_row.project_id:
                raise invalid_argument("INVALID_NAME", "crawl must belong to project", field="crawl")
            _, crawl = await self._crawl(request.crawl)
        else:
            latest = await asyncio.to_thread(self.store.latest_succeeded_crawl, project_row.pk)
            if latest is None:
                raise failed_precondition("NO_COMPLETED_CRAWL", "the project has no succeeded crawl yet; start one",
                                          project=project_row.project_id)
            crawl = latest
        rows = await asyncio.to_thread(self.store.crawl_pages, crawl.pk)
        entities = [PageEntity(url=r.url, organization=dict(r.entity.get("organization") or {})) for r in rows]
        project = pb.Project.FromString(project_row.body)
        name = f"projects/{project_row.project_id}/crawls/{crawl.crawl_id}"
        report = await asyncio.to_thread(consistency_report, project.brand, entities, name)
        return pb.GetEntityConsistencyResponse(report=report)

    # --- share-of-voice runs -------------------------------------------------------------------

    async def _run(self, name: str) -> tuple[ProjectRow, RunRow]:
        project_id, run_id = parse_name(name, "projects", "shareOfVoiceRuns")
        project = await self._project(f"projects/{project_id}")
        run = await asyncio.to_thread(self.store.get_run, project.pk, run_id)
        if run is None:
            raise not_found("RUN_NOT_FOUND", f"no share-of-voice run {run_id!r} in project {project_id!r}", run=run_id)
        return project, run

    async def _resolve_engines(self, project: pb.Project, names: Sequence[str]) -> list[EngineRef]:
        known = {e.name: e for e in project.engines}
        resolved: list[EngineRef] = []
        router_names = [n for n in names if n not in known]
        if router_names:
            if not self.settings.engine_url:
                raise failed_precondition("ENGINES_NOT_CONFIGURED", f"engine {preview(router_names[0])!r} is not a "
                                          "project engine and the service has no router URL "
                                          "(LLMO_VISIBILITY_ENGINE_URL)", engine=preview(router_names[0]))
            listed = await self.router_models() if self.router_models is not None else None
            for name in router_names:
                if listed is not None and name not in listed:
                    raise not_found("ENGINE_NOT_FOUND", f"{preview(name)!r} is neither a project engine nor a model "
                                    "the router lists", engine=preview(name))
        for name in names:
            if len(name) > 256:
                raise invalid_argument("FIELD_TOO_LONG", "engine names are at most 256 characters", field="engines")
            engine = known.get(name)
            if engine is not None:
                resolved.append(EngineRef(name=engine.name, model=engine.model or engine.name,
                                          base_url=engine.base_url, surface=engine.surface or pb.SURFACE_API,
                                          api_key_env=engine.api_key_env))
            else:
                resolved.append(EngineRef(name=name, model=name, base_url="", surface=pb.SURFACE_API))
        return resolved

    async def CreateShareOfVoiceRun(self, request: pb.CreateShareOfVoiceRunRequest,
                                    context: grpc.aio.ServicerContext) -> pb.CreateShareOfVoiceRunResponse:
        project_row = await self._project(request.parent, "parent")
        project = pb.Project.FromString(project_row.body)
        run_id = resource_id(request.share_of_voice_run_id, "INVALID_RUN_ID", "share_of_voice_run_id") \
            if request.share_of_voice_run_id else uuid.uuid4().hex[:32]
        asked = request.share_of_voice_run
        samples = asked.samples_per_query or 1
        if not 1 <= samples <= 10:
            raise invalid_argument("INVALID_SAMPLES", "samples_per_query must be within 1..10 (0 means 1)",
                                   field="share_of_voice_run.samples_per_query")
        names = list(dict.fromkeys(asked.engines or project.default_engines or [e.name for e in project.engines]))
        if not names:
            raise invalid_argument("NO_ENGINES", "name engines in the run or default_engines in the project",
                                   field="share_of_voice_run.engines")
        if len(names) > 20:
            raise invalid_argument("NO_ENGINES", "at most 20 engines per run", field="share_of_voice_run.engines")
        weights_of = dict(project_queries(project))
        queries = list(dict.fromkeys(q for q in asked.queries)) if asked.queries else list(weights_of)
        if not queries or any(not q.strip() for q in queries):
            raise invalid_argument("NO_QUERIES", "name queries in the run or tracked queries in the project "
                                   "(none may be empty)", field="share_of_voice_run.queries")
        if len(queries) > MAX_RUN_QUERIES or any(len(q) > 2000 for q in queries):
            raise invalid_argument("NO_QUERIES", f"at most {MAX_RUN_QUERIES} queries of at most 2000 characters",
                                   field="share_of_voice_run.queries")
        engines = await self._resolve_engines(project, names)
        spec = pb.ShareOfVoiceRun(engines=[e.name for e in engines], queries=queries, samples_per_query=samples,
                                  query_set_version=project_row.query_set_version)
        plan = {"engines": [e.as_json() for e in engines], "brands": brands_json(brands_of(project)),
                "weights": [weights_of.get(q, 1.0) for q in queries]}
        row = RunRow(0, project_row.pk, run_id, spec.SerializeToString(), plan, 1,
                     len(queries) * len(engines) * samples, 0, 0, 0, 0, 0, b"", "", "", False,
                     request.request_id[:128], now_us(), 0, 0)
        tenant_pks = await asyncio.to_thread(self.store.tenant_project_pks, project_row.tenant)
        try:
            row = await asyncio.to_thread(self.store.create_run, row, tenant_pks, self.settings.max_active_runs)
        except AlreadyExists:
            raise already_exists("RUN_ALREADY_EXISTS", f"run {run_id!r} exists", run=run_id) from None
        except TooManyActive:
            raise resource_exhausted("TOO_MANY_ACTIVE_RUNS", f"at most {self.settings.max_active_runs} PENDING or "
                                     "RUNNING share-of-voice runs per tenant") from None
        self.runs.wake()
        return pb.CreateShareOfVoiceRunResponse(share_of_voice_run=run_proto(row, project_row.project_id))

    async def GetShareOfVoiceRun(self, request: pb.GetShareOfVoiceRunRequest,
                                 context: grpc.aio.ServicerContext) -> pb.GetShareOfVoiceRunResponse:
        project, run = await self._run(request.name)
        return pb.GetShareOfVoiceRunResponse(share_of_voice_run=run_proto(run, project.project_id))

    async def ListShareOfVoiceRuns(self, request: pb.ListShareOfVoiceRunsRequest,
                                   context: grpc.aio.ServicerContext) -> pb.ListShareOfVoiceRunsResponse:
        project = await self._project(request.parent, "parent")
        limit = page_size(request.page_size)
        before = _before(request.page_token, request.parent)
        rows = await asyncio.to_thread(self.store.list_runs, project.pk, before, limit)
        token = encode_page_token({"t": rows[-1].create_us, "id": rows[-1].run_id}, query=request.parent) \
            if len(rows) == limit else ""
        return pb.ListShareOfVoiceRunsResponse(share_of_voice_runs=[run_proto(r, project.project_id) for r in rows],
                                               next_page_token=token)

    async def WatchShareOfVoiceRun(self, request: pb.WatchShareOfVoiceRunRequest,
                                   context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchShareOfVoiceRunResponse]:
        project, run = await self._run(request.name)
        yield pb.WatchShareOfVoiceRunResponse(share_of_voice_run=run_proto(run, project.project_id))
        while run.state in ACTIVE_STATES:
            with contextlib.suppress(TimeoutError):
                async with self.runs.changed:
                    await asyncio.wait_for(self.runs.changed.wait(), timeout=1.0)
            fresh = await asyncio.to_thread(self.store.run_by_pk, run.pk)
            if fresh is None:
                return
            if (fresh.answers_completed, fresh.answers_failed, fresh.state) != (
                    run.answers_completed, run.answers_failed, run.state):
                yield pb.WatchShareOfVoiceRunResponse(share_of_voice_run=run_proto(fresh, project.project_id))
            run = fresh

    async def CancelShareOfVoiceRun(self, request: pb.CancelShareOfVoiceRunRequest,
                                    context: grpc.aio.ServicerContext) -> pb.CancelShareOfVoiceRunResponse:
        project, run = await self._run(request.name)
        if run.state in ACTIVE_STATES:
            await asyncio.to_thread(self.store.request_run_cancel, run.pk)
            latest = await asyncio.to_thread(self.store.run_by_pk, run.pk)
            run = latest if latest is not None else run
        return pb.CancelShareOfVoiceRunResponse(share_of_voice_run=run_proto(run, project.project_id))

    async def ListAnswers(self, request: pb.ListAnswersRequest, context: grpc.aio.ServicerContext) -> pb.ListAnswersResponse:
        _project, run = await self._run(request.parent)
        limit = page_size(request.page_size)
        position = decode_page_token(request.page_token, query=request.parent)
        after = None
        if position is not None:
            try:
                after = (int(position["q"]), str(position["e"]), int(position["s"]))
            except (KeyError, TypeError, ValueError):
                raise invalid_argument("INVALID_PAGE_TOKEN", "page_token is malformed or belongs to another "
                                       "query") from None
        rows = await asyncio.to_thread(self.store.run_answers, run.pk, after, limit)
        out = pb.ListAnswersResponse()
        for row in rows:
            answer = pb.Answer.FromString(row.body)
            answer.name = f"{request.parent}/answers/{row.query_index}-{row.engine}-{row.sample}"
            out.answers.append(answer)
        if len(rows) == limit:
            last = rows[-1]
            out.next_page_token = encode_page_token({"q": last.query_index, "e": last.engine, "s": last.sample},
                                                    query=request.parent)
        return out

    async def GetShareOfVoiceTrend(self, request: pb.GetShareOfVoiceTrendRequest,
                                   context: grpc.aio.ServicerContext) -> pb.GetShareOfVoiceTrendResponse:
        project_row = await self._project(request.project, "project")
        start, end = _window(request.start_time, request.end_time, request.HasField("end_time"))
        granularity = request.granularity or pb.GRANULARITY_DAY
        rows = await asyncio.to_thread(self.store.succeeded_runs, project_row.pk, start, end)
        wanted = set(request.engines)
        resamples = min(self.settings.sov_resamples, 500)

        def build() -> pb.GetShareOfVoiceTrendResponse:
            pooled: dict[tuple[int, str], list[Any]] = {}
            brands_by_bucket: dict[int, Any] = {}
            for run in rows:
                spec = pb.ShareOfVoiceRun.FromString(run.spec)
                weights = list(run.plan.get("weights") or [1.0] * len(spec.queries))
                bucket = bucket_start_us(run.end_us, granularity)
                brands_by_bucket[bucket] = brands_from_json(run.plan["brands"])
                for answer in to_answers(self.store.run_answers(run.pk), spec.queries, weights):
                    if not wanted or answer.engine in wanted:
                        pooled.setdefault((bucket, answer.engine), []).append(answer)
            out = pb.GetShareOfVoiceTrendResponse()
            for (bucket, engine), answers in sorted(pooled.items()):
                for metrics in sorted(brand_metrics(answers, brands_by_bucket[bucket], resamples=resamples),
                                      key=lambda m: m.brand):
                    mentions = sum(1 for a in answers if a.analysis.mentioned.get(metrics.brand))
                    out.points.append(pb.TrendPoint(
                        bucket_start_time=timestamp(bucket), engine=engine, brand=metrics.brand,
                        share_of_voice=metrics.mention_sov.estimate, mentions=mentions, answers=len(answers),
                        mention_share=pb.Interval(estimate=metrics.mention_sov.estimate, low=metrics.mention_sov.low,
                                                  high=metrics.mention_sov.high),
                        mention_rate=pb.Interval(estimate=metrics.mention_rate.estimate,
                                                 low=metrics.mention_rate.low, high=metrics.mention_rate.high)))
            return out

        return await asyncio.to_thread(build)

    async def ListCoverageGaps(self, request: pb.ListCoverageGapsRequest,
                               context: grpc.aio.ServicerContext) -> pb.ListCoverageGapsResponse:
        project_row = await self._project(request.parent, "parent")
        limit = page_size(request.page_size)
        query_key = f"{request.parent}|{request.share_of_voice_run}"
        offset = (decode_page_token(request.page_token, query=query_key) or {}).get("o", 0)
        if not isinstance(offset, int) or offset < 0:
            raise invalid_argument("INVALID_PAGE_TOKEN", "page_token is malformed or belongs to another query")
        if request.share_of_voice_run:
            project_id, _ = parse_name(request.share_of_voice_run, "projects", "shareOfVoiceRuns")
            if project_id != project_row.project_id:
                raise invalid_argument("INVALID_NAME", "share_of_voice_run must belong to parent",
                                       field="share_of_voice_run")
            _, run = await self._run(request.share_of_voice_run)
        else:
            succeeded = await asyncio.to_thread(self.store.succeeded_runs, project_row.pk)
            if not succeeded:
                raise failed_precondition("NO_COMPLETED_RUN", "the project has no succeeded share-of-voice run yet",
                                          project=project_row.project_id)
            run = succeeded[-1]
        crawl = await asyncio.to_thread(self.store.latest_succeeded_crawl, project_row.pk)
        spec = pb.ShareOfVoiceRun.FromString(run.spec)

        def build() -> list[pb.CoverageGap]:
            weights = list(run.plan.get("weights") or [1.0] * len(spec.queries))
            answers = to_answers(self.store.run_answers(run.pk), spec.queries, weights)
            passages = Passages.empty()
            if crawl is not None:
                page_urls, texts, vectors = [], [], []
                rows = [p for p in self.store.crawl_pages(crawl.pk) if not p.failed and p.passages]
                # Pages crawled while the project tracked no queries were stored without vectors.
                missing = [p for p in rows if not p.embeddings]
                if missing:
                    encoded = self.embedder.encode([t for p in missing for t in p.passages])
                    start, fresh = 0, {}
                    for p in missing:
                        p.embeddings = encoded[start:start + len(p.passages)].astype(np.float32).tobytes()
                        fresh[p.page_id] = p.embeddings
                        start += len(p.passages)
                    self.store.set_page_embeddings(crawl.pk, fresh)
                for page in rows:
                    matrix = np.frombuffer(page.embeddings, dtype=np.float32).reshape(len(page.passages), -1)
                    page_urls += [page.url] * len(page.passages)
                    texts += list(page.passages)
                    vectors.append(matrix)
                if vectors:
                    passages = Passages(page_urls, texts, np.vstack(vectors))
            query_vectors = self.embedder.encode(list(spec.queries))
            return coverage_gaps(list(spec.queries), query_vectors, answers, brands_from_json(run.plan["brands"]),
                                 list(spec.engines), passages, self.settings.gap_similarity_threshold)

        gaps = await asyncio.to_thread(build)
        page = gaps[offset:offset + limit]
        token = encode_page_token({"o": offset + limit}, query=query_key) if offset + limit < len(gaps) else ""
        return pb.ListCoverageGapsResponse(coverage_gaps=page, next_page_token=token)

    # --- referral traffic ----------------------------------------------------------------------

    async def RecordReferralVisits(self, request: pb.RecordReferralVisitsRequest,
                                   context: grpc.aio.ServicerContext) -> pb.RecordReferralVisitsResponse:
        project_row = await self._project(request.project, "project")
        if len(request.visits) > MAX_VISITS:
            raise invalid_argument("TOO_MANY_VISITS", f"at most {MAX_VISITS} visits per call (got "
                                   f"{len(request.visits)}); send them in batches", field="visits")
        project = pb.Project.FromString(project_row.body)
        response = pb.RecordReferralVisitsResponse()
        rows: list[VisitRow] = []
        for index, visit in enumerate(request.visits):
            reason, message = _visit_problem(visit, project.domains)
            if reason:
                response.rejected.append(pb.RejectedVisit(index=index, reason=reason, message=message))
                continue
            engine = classify_referral(visit.referrer, visit.utm_source) or ""
            crawler_match = classify_crawler(visit.user_agent)
            crawler = crawler_match.token if crawler_match is not None else ""
            visit_id = visit.visit_id or hashlib.sha256("\x1f".join((
                str(_us(visit.visit_time)), visit.landing_url, visit.referrer, visit.user_agent, visit.utm_source,
                str(visit.count))).encode()).hexdigest()[:40]
            rows.append(VisitRow(visit_id=visit_id[:128], visit_us=_us(visit.visit_time),
                                 landing_url=urls.normalize_url(visit.landing_url) or visit.landing_url,
                                 engine=engine if not crawler else "", crawler=crawler, count=visit.count or 1))
        accepted, _ = await asyncio.to_thread(self.store.record_visits, project_row.pk, rows)
        response.accepted, response.duplicates = accepted, len(rows) - accepted
        response.ai_referrals = sum(1 for r in rows if r.engine)
        return response

    async def GetReferralTraffic(self, request: pb.GetReferralTrafficRequest,
                                 context: grpc.aio.ServicerContext) -> pb.GetReferralTrafficResponse:
        project_row = await self._project(request.project, "project")
        start, end = _window(request.start_time, request.end_time, request.HasField("end_time"))
        if request.top_pages < 0:
            raise invalid_argument("INVALID_TOP_PAGES", "top_pages must be >= 0", field="top_pages")
        rows = await asyncio.to_thread(self.store.visits_between, project_row.pk, start, end)
        return await asyncio.to_thread(referral_report, rows, request.granularity or pb.GRANULARITY_DAY,
                                       min(request.top_pages or 10, 1000))


def _page_name(name: str) -> tuple[str, str, str]:
    parts = name.split("/")
    if len(parts) != 6 or parts[0] != "projects" or parts[2] != "crawls" or parts[4] != "pages" or \
            len(parts[5]) != 16 or any(c not in "0123456789abcdef" for c in parts[5]):
        raise invalid_argument("INVALID_NAME", "expected projects/{project}/crawls/{crawl}/pages/{page} with a "
                               f"16-hex page id; got {preview(name)!r}", name=preview(name))
    project_id, crawl_id = parse_name("/".join(parts[:4]), "projects", "crawls")
    return project_id, crawl_id, parts[5]


def _before(token: str, query: str) -> tuple[int, str] | None:
    position = decode_page_token(token, query=query)
    if position is None:
        return None
    stamp, last = position.get("t"), position.get("id")
    if not isinstance(stamp, int) or not isinstance(last, str):
        raise invalid_argument("INVALID_PAGE_TOKEN", "page_token is malformed or belongs to another query")
    return stamp, last


def _window(start: Any, end: Any, has_end: bool) -> tuple[int, int]:
    start_us = _us(start)
    end_us = _us(end) if has_end else now_us() + 1
    if start_us >= end_us:
        raise invalid_argument("INVALID_WINDOW", "start_time must be before end_time", field="start_time")
    return start_us, end_us


def _visit_problem(visit: pb.ReferralVisit, domains: Sequence[str]) -> tuple[str, str]:
    if not visit.HasField("visit_time") or _us(visit.visit_time) <= 0:
        return "MISSING_VISIT_TIME", "visit_time is required"
    if visit.count < 0 or visit.count > 10_000_000:
        return "INVALID_COUNT", "count must be within 0..10000000 (0 means 1)"
    normal = urls.normalize_url(visit.landing_url) if len(visit.landing_url) <= 4000 else None
    if normal is None:
        return "INVALID_URL", f"landing_url is not an http(s) URL: {preview(visit.landing_url)!r}"
    if not urls.in_domains(normal, domains):
        return "DOMAIN_NOT_IN_PROJECT", f"{urls.host_of(normal)} is not one of the project's domains"
    if len(visit.referrer) > 4000 or len(visit.user_agent) > 4000 or len(visit.utm_source) > 256 or \
            len(visit.visit_id) > 128:
        return "INVALID_URL", "referrer and user_agent are at most 4000 characters, utm_source 256, visit_id 128"
    return "", ""

