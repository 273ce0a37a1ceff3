"""`llmo visibility ...`: projects, crawls, page scores, share of voice, coverage gaps, AI referral
traffic and the HTML report on the visibility service; `extract-eval` measures main-content
extraction offline on a ScrapingHub-layout benchmark."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

out = Console()
err = Console(stderr=True)
SERVICE_TIMEOUT_S = 120.0
UPLOAD_BATCH = 5000


class InputError(click.ClickException):
    exit_code = 2


@click.group(short_help="Crawls, page scores, share of voice, gaps, AI referrals, reports.")
@click.option("--endpoint", "--address", "endpoint", envvar="LLMO_VISIBILITY_ENDPOINT", default=None,
              help="Visibility service host:port (env LLMO_VISIBILITY_ENDPOINT) [default: the running `llmo up` "
                   "stack's, else 127.0.0.1:50055].")
@click.option("--api-key", envvar="LLMO_API_KEY", default=None, help="API key (Bearer) when the service requires one.")
@click.pass_context
def cli(ctx: click.Context, endpoint: str | None, api_key: str | None) -> None:
    """Answer-engine visibility: `project` definitions, `crawl` a brand's site (polite, robots.txt,
    SSRF-safe) and score its pages, `score` one page, `sov` measures share of voice across answer
    engines with 95% intervals, `gaps` lists queries where the brand is missing, `referrals` ingests
    access logs or GA4 exports, `report` writes an HTML report with plots."""
    ctx.obj = {"endpoint": endpoint, "api_key": api_key}


def _call(ctx: click.Context, action: Any) -> Any:
    from llmo.cli.service_client import call_service, default_endpoint
    from llmo.protos.visibility.v1 import visibility_service_pb2_grpc as pb_grpc

    endpoint = ctx.obj["endpoint"] or default_endpoint("visibility")
    return call_service("visibility", endpoint, ctx.obj["api_key"], pb_grpc.VisibilityServiceStub, action)


def _json(message: Any) -> None:
    from google.protobuf import json_format

    out.print_json(json_format.MessageToJson(message))


def _project_name(project: str) -> str:
    return project if project.startswith("projects/") else f"projects/{project}"


# --- projects -----------------------------------------------------------------------------------


@cli.group()
def project() -> None:
    """Create, show and list projects (a brand, its domains, competitors, tracked queries, engines)."""


@project.command("create")
@click.argument("project_id")
@click.option("--file", "path", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="The project as JSON or YAML in the shape of llmo.visibility.v1.Project "
                   "(brand, domains, competitors, queries, engines, crawl_config).")
@click.option("--json", "as_json", is_flag=True, help="Print the created project as JSON.")
@click.pass_context
def project_create(ctx: click.Context, project_id: str, path: Path, as_json: bool) -> None:
    """Create PROJECT_ID from a file."""
    import yaml
    from google.protobuf import json_format

    from llmo.protos.visibility.v1 import visibility_service_pb2 as pb

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        body = json_format.ParseDict(raw, pb.Project())
    except OSError as error:
        raise InputError(f"{path}: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    except (yaml.YAMLError, json_format.ParseError, TypeError) as error:
        raise InputError(f"{path}: not a Project: {error}") from error

    async def action(stub: Any, metadata: list[tuple[str, str]]) -> Any:
        return (await stub.CreateProject(pb.CreateProjectRequest(project_id=project_id, project=body,
                                                                 request_id=str(uuid.uuid4())),
                                         metadata=metadata, timeout=SERVICE_TIMEOUT_S)).project

    created = _call(ctx, action)
    if as_json:
        _json(created)
    else:
        out.print(f"created {created.name}: {created.brand.name} on {', '.join(created.domains)}, "
                  f"{len(created.queries) + len(created.tracked_queries)} tracked queries")


@project.command("show")
@click.argument("project_id")
@click.pass_context
def project_show(ctx: click.Context, project_id: str) -> None:
    """Print a project as JSON."""
    from llmo.protos.visibility.v1 import visibility_service_pb2 as pb

    async def action(stub: Any, metadata: list[tuple[str, str]]) -> Any:
        return (await stub.GetProject(pb.GetProjectRequest(name=_project_name(project_id)), metadata=metadata,
                                      timeout=SERVICE_TIMEOUT_S)).project

    _json(_call(ctx, action))


@project.command("list")
@click.pass_context
def project_list(ctx: click.Context) -> None:
    """List the caller's projects."""
    from llmo.protos.visibility.v1 import visibility_service_pb2 as pb

    async def action(stub: Any, metadata: list[tuple[str, str]]) -> list[Any]:
        projects, token = [], ""
        while True:
            reply = await stub.ListProjects(pb.ListProjectsRequest(page_token=token), metadata=metadata,
                                            timeout=SERVICE_TIMEOUT_S)
            projects += list(reply.projects)
            token = reply.next_page_token
            if not token:
                return projects

    table = Table("project", "brand", "domains", "queries", "query set version")
    for item in _call(ctx, action):
        table.add_row(item.name, item.brand.name, ", ".join(item.domains),
                      str(len(item.queries) + len(item.tracked_queries)), str(item.query_set_version))
    out.print(table)


# --- crawls and pages ---------------------------------------------------------------------------


def _pages_table(pages: list[Any], limit: int) -> Table:
    table = Table("overall", "relevance", "authority", "clarity", "quality", "url", "top finding",
                  title=f"Lowest-scoring pages (of {len(pages)})")
    for page in sorted(pages, key=lambda p: p.score.overall)[:limit]:
        pillars = page.score.pillars
        finding = page.error_reason or (page.score.findings[0].code if page.score.findings else "")
        table.add_row(f"{page.score.overall:.0f}", f"{pillars.relevance:.0f}" if pillars.relevance_applicable
                      else "-", f"{pillars.authority:.0f}", f"{pillars.clarity:.0f}", f"{pillars.quality:.0f}",
                      page.url, finding)
    return table


def _sources_table(summary: Any) -> Table:
    table = Table("names brand", "status", "source", "as written", "competitors",
                  title=f"Third-party mentions: {summary.third_party_mentions} of {len(summary.mention_sources)} "
                        "sources name the brand")
    for source in summary.mention_sources:
        table.add_row("yes" if source.mentions_brand else "no", source.error_reason or str(source.http_status),
                      source.url, source.matched, ", ".join(source.competitors))
    return table


@cli.command()
@click.argument("project_id")
@click.option("--seed", "seeds", multiple=True, help="Start URL (repeatable; default: https://{domain}/ per domain).")
@click.option("--max-pages", type=click.IntRange(1, 10_000), default=None, help="Most pages fetched [default: 500].")
@click.option("--max-depth", type=click.IntRange(1, 50), default=None, help="Link depth from the seeds [default: 5].")
@click.option("--rate", "requests_per_second", type=click.FloatRange(0, 10, min_open=True), default=None,
              help="Requests per second per host [default: 1; robots.txt Crawl-delay wins when slower].")
@click.option("--crawl-id", default="", help="Crawl id (default: server-assigned).")
@click.option("--no-wait", is_flag=True, help="Start the crawl and return.")
@click.option("--json", "as_json", is_flag=True, help="Print the finished crawl as JSON.")
@click.pass_context
def crawl(ctx: click.Context, project_id: str, seeds: tuple[str, ...], max_pages: int | None, max_depth: int | None,
          requests_per_second: float | None, crawl_id: str, no_wait: bool, as_json: bool) -> None:
    """Crawl a project's site and score every page (progress bar; table of the pages to fix first)."""
    from llmo.protos.visibility.v1 import visibility_service_pb2 as pb

    config = pb.CrawlConfig(max_pages=max_pages or 0, max_depth=max_depth or 0,
                            requests_per_second=requests_per_second or 0)

    async def action(stub: Any, metadata: list[tuple[str, str]]) -> tuple[Any, list[Any]]:
        started = (await stub.StartCrawl(pb.StartCrawlRequest(
            parent=_project_name(project_id), crawl_id=crawl_id, request_id=str(uuid.uuid4()),
            crawl=pb.Crawl(seed_urls=list(seeds), config=config)), metadata=metadata, timeout=SERVICE_TIMEOUT_S)).crawl
        if no_wait:
            return started, []
        last = started
        with Progress(TextColumn(started.name), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                      TimeElapsedColumn(), console=err, transient=True) as progress:
            task = progress.add_task("", total=started.config.max_pages)
            async for reply in stub.WatchCrawl(pb.WatchCrawlRequest(name=started.name), metadata=metadata):
                last = reply.crawl
                done = last.progress.pages_fetched + last.progress.pages_failed
                progress.update(task, completed=done, total=min(last.config.max_pages, max(
                    done + last.progress.pages_queued, 1)), description=reply.latest_page.url[-60:])
        pages, token = [], ""
        while True:
            reply = await stub.ListPages(pb.ListPagesRequest(parent=last.name, page_token=token, page_size=1000),
                                         metadata=metadata, timeout=SERVICE_TIMEOUT_S)
            pages += list(reply.pages)
            token = reply.next_page_token
            if not token:
                return last, pages

    final, pages = _call(ctx, action)
    if as_json:
        _json(final)
        return
    state = pb.JobState.Name(final.state).removeprefix("JOB_STATE_")
    p = final.progress
    out.print(f"{final.name}: {state}; {p.pages_fetched} fetched ({p.pages_unchanged} unchanged), {p.pages_failed} "
              f"failed, {p.pages_disallowed} disallowed by robots.txt, {p.pages_trapped} traps skipped")
    if final.summary.mean_overall:
        s = final.summary
        out.print(f"mean score {s.mean_overall:.1f}; llms.txt {'found' if s.llms_txt_found else 'missing'}; "
                  f"AI crawlers blocked: {', '.join(s.ai_bots_blocked) or 'none'}")
    if final.summary.mention_sources:
        out.print(_sources_table(final.summary))
    if pages:
        out.print(_pages_table(pages, 20))
    if final.state not in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_PENDING, pb.JOB_STATE_RUNNING):
        raise SystemExit(1)


@cli.command()
@click.argument("url", required=False)
@click.option("--html", "html_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Score this HTML file instead of fetching URL (URL, when given, resolves its links).")
@click.option("--project", "project_id", default="", help="Project whose brand facts and queries the scores use.")
@click.option("--json", "as_json", is_flag=True, help="Print the scored page as JSON.")
@click.pass_context
def score(ctx: click.Context, url: str | None, html_path: Path | None, project_id: str, as_json: bool) -> None:
    """Score one page on the four pillars, with the findings to fix."""
    from llmo.protos.visibility.v1 import visibility_service_pb2 as pb

    if html_path is None and not url:
        raise click.UsageError("give a URL or --html FILE")
    request = pb.ScorePageRequest(project=_project_name(project_id) if project_id else "")
    if html_path is not None:
        try:
            request.html = html_path.read_bytes().decode("utf-8", "replace")
        except OSError as error:
            raise InputError(f"{html_path}: {error.strerror or error}") from error
        request.base_url = url or ""
    else:
        request.url = url or ""

    async def action(stub: Any, metadata: list[tuple[str, str]]) -> Any:
        return (await stub.ScorePage(request, metadata=metadata, timeout=SERVICE_TIMEOUT_S)).page

    page = _call(ctx, action)
    if as_json:
        _json(page)
        return
    pillars = page.score.pillars
    out.print(f"[bold]{page.title or page.url}[/]: overall {page.score.overall:.0f}/100")
    table = Table("pillar", "score")
    table.add_row("relevance", f"{pillars.relevance:.0f}" if pillars.relevance_applicable else "n/a (no queries)")
    for name in ("authority", "clarity", "quality"):
        table.add_row(name, f"{getattr(pillars, name):.0f}")
    out.print(table)
    mentions = next((s for s in page.score.signals if s.name == "third_party_mentions"), None)
    if mentions is not None:
        out.print(f"third-party mentions (the project's latest crawl): {mentions.value:.0f}")
    findings = Table("impact", "severity", "code", "recommendation", title="What to fix")
    for finding in page.score.findings:
        findings.add_row(f"{finding.impact:.1f}", pb.Severity.Name(finding.severity).removeprefix("SEVERITY_").lower(),
                         finding.code, finding.recommendation)
    out.print(findings)


# --- share of voice -----------------------------------------------------------------------------


def _interval(value: Any) -> str:
    return f"{value.estimate:.2f} [{value.low:.2f}, {value.high:.2f}]"


@cli.command()
@click.argument("project_id")
@click.option("--engine", "engines", multiple=True, help="Engine (a project engine or a router model; repeatable) "
              "[default: the project's default engines].")
@click.option("--query", "queries", multiple=True, help="Query (repeatable) [default: the tracked queries].")
@click.option("--samples", type=click.IntRange(1, 10), default=3, show_default=True,
              help="Answers per query and engine.")
@click.option("--run-id", default="", help="Run id (default: server-assigned).")
@click.option("--json", "as_json", is_flag=True, help="Print the finished run as JSON.")
@click.pass_context
def sov(ctx: click.Context, project_id: str, engines: tuple[str, ...], queries: tuple[str, ...], samples: int,
        run_id: str, as_json: bool) -> None:
    """Measure share of voice: every query asked to every engine SAMPLES times; rates with 95% intervals."""
    from llmo.protos.visibility.v1 import visibility_service_pb2 as pb

    spec = pb.ShareOfVoiceRun(engines=list(engines), queries=list(queries), samples_per_query=samples)

    async def action(stub: Any, metadata: list[tuple[str, str]]) -> Any:
        created = (await stub.CreateShareOfVoiceRun(pb.CreateShareOfVoiceRunRequest(
            parent=_project_name(project_id), share_of_voice_run_id=run_id, share_of_voice_run=spec,
            request_id=str(uuid.uuid4())), metadata=metadata, timeout=SERVICE_TIMEOUT_S)).share_of_voice_run
        last = created
        with Progress(TextColumn(created.name), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                      transient=True) as progress:
            task = progress.add_task("answers", total=created.progress.answers_total)
            async for reply in stub.WatchShareOfVoiceRun(pb.WatchShareOfVoiceRunRequest(name=created.name),
                                                          metadata=metadata):
                last = reply.share_of_voice_run
                progress.update(task, completed=last.progress.answers_completed + last.progress.answers_failed)
        return last

    run = _call(ctx, action)
    if as_json:
        _json(run)
    else:
        for engine in run.engine_shares:
            table = Table("brand", "mention rate", "mention share", "citation rate", "position-weighted",
                          title=f"{engine.engine} ({engine.answers} answers)")
            for brand in engine.brands:
                name = f"[bold]{brand.brand}[/]" if brand.is_project_brand else brand.brand
                table.add_row(name, _interval(brand.mention_rate), _interval(brand.mention_share),
                              _interval(brand.citation_rate), _interval(brand.position_weighted_share))
            out.print(table)
        out.print(f"overall mention share of the brand: {_interval(run.overall.mention_share)}; "
                  f"{run.progress.answers_failed} answers failed; cost {run.cost.micros / 1e6:.4f} USD")
        for change in run.changes:
            if change.significant:
                out.print(f"[yellow]significant change[/] {change.engine}: {change.metric} {change.before:.2f} -> "
                          f"{change.after:.2f} (p = {change.p_value:.3f})")
    if run.state != pb.JOB_STATE_SUCCEEDED:
        raise click.ClickException(f"{run.name} ended {pb.JobState.Name(run.state)}: {run.error_reason} "
                                   f"{run.error_message}".strip())


@cli.command()
@click.argument("project_id")
@click.option("--run", "run_id", default="", help="Share-of-voice run id [default: the latest succeeded].")
@click.option("--json", "as_json", is_flag=True, help="Print the gaps as JSON.")
@click.pass_context
def gaps(ctx: click.Context, project_id: str, run_id: str, as_json: bool) -> None:
    """Queries where the brand is missing from answers or that no crawled page answers."""
    from llmo.protos.visibility.v1 import visibility_service_pb2 as pb

    parent = _project_name(project_id)

    async def action(stub: Any, metadata: list[tuple[str, str]]) -> list[Any]:
        found, token = [], ""
        while True:
            reply = await stub.ListCoverageGaps(pb.ListCoverageGapsRequest(
                parent=parent, page_token=token, page_size=1000,
                share_of_voice_run=f"{parent}/shareOfVoiceRuns/{run_id}" if run_id else ""),
                metadata=metadata, timeout=SERVICE_TIMEOUT_S)
            found += list(reply.coverage_gaps)
            token = reply.next_page_token
            if not token:
                return found

    found = _call(ctx, action)
    if as_json:
        from google.protobuf import json_format

        out.print_json(json.dumps([json_format.MessageToDict(g) for g in found]))
        return
    table = Table("opportunity", "kind", "query", "engines missing", "competitors", "best page (similarity)",
                  title="Coverage gaps")
    for gap in found:
        table.add_row(f"{gap.opportunity:.2f}", pb.GapKind.Name(gap.kind).removeprefix("GAP_KIND_").lower(), gap.query,
                      ", ".join(gap.engines), ", ".join(gap.competitors_present),
                      f"{gap.best_page_url} ({gap.best_page_similarity:.2f})" if gap.best_page_url else "-")
    out.print(table)


# --- referrals ----------------------------------------------------------------------------------


def _visits_from_files(access_logs: tuple[Path, ...], site: str, ga4: tuple[Path, ...]) -> tuple[list[Any], int]:
    from llmo.visibility.referrals import parse_combined_log, parse_ga4_csv

    visits, bad = [], 0
    for path in access_logs:
        try:
            with path.open(encoding="utf-8", errors="replace") as handle:
                for _, visit, error in parse_combined_log(handle, site=site):
                    if visit is not None:
                        visits.append(visit)
                    elif error:
                        bad += 1
        except OSError as error:
            raise InputError(f"{path}: {error.strerror or error}") from error
    for path in ga4:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            raise InputError(f"{path}: {error.strerror or error}") from error
        for _, visit, problem in parse_ga4_csv(text):
            if problem == "UNRECOGNISED_COLUMNS":
                raise InputError(f"{path}: no GA4 columns recognised (need a landing page and a source or referrer)")
            if visit is not None:
                visits.append(visit)
            elif problem:
                bad += 1
    return visits, bad


@cli.command()
@click.argument("project_id")
@click.option("--access-log", "access_logs", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="A web-server access log in combined log format to ingest (repeatable).")
@click.option("--site", default="", help="Scheme and host of the logged site, e.g. https://example.com "
              "(needed with --access-log; GA4 landing paths resolve against it) [default for GA4: "
              "https://{the project's first domain}].")
@click.option("--ga4", "ga4", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="A GA4 CSV export to ingest (repeatable).")
@click.option("--days", type=click.IntRange(1, 3650), default=30, show_default=True, help="Window of the report.")
@click.option("--json", "as_json", is_flag=True, help="Print the traffic report as JSON.")
@click.pass_context
def referrals(ctx: click.Context, project_id: str, access_logs: tuple[Path, ...], site: str, ga4: tuple[Path, ...],
              days: int, as_json: bool) -> None:
    """Ingest access logs or GA4 exports, then report AI referral visits and AI crawler fetches."""
    from google.protobuf import timestamp_pb2

    from llmo.protos.visibility.v1 import visibility_service_pb2 as pb

    if access_logs and not site:
        raise click.UsageError("--access-log needs --site (the logged site's scheme and host)")
    visits, bad = _visits_from_files(access_logs, site, ga4)
    name = _project_name(project_id)

    def stamp(moment: datetime) -> timestamp_pb2.Timestamp:
        value = timestamp_pb2.Timestamp()
        value.FromDatetime(moment.astimezone(UTC).replace(tzinfo=None))
        return value

    async def action(stub: Any, metadata: list[tuple[str, str]]) -> tuple[int, int, Counter[str], Any]:
        accepted = duplicates = 0
        rejected: Counter[str] = Counter()
        base = site
        if visits and not base:  # GA4 landing pages are paths: they belong to the project's site
            project = (await stub.GetProject(pb.GetProjectRequest(name=name), metadata=metadata,
                                             timeout=SERVICE_TIMEOUT_S)).project
            base = f"https://{project.domains[0]}" if project.domains else ""
        for start in range(0, len(visits), UPLOAD_BATCH):
            batch = [pb.ReferralVisit(visit_time=stamp(v.time), landing_url=urljoin(base + "/", v.landing_url)
                                      if base else v.landing_url, referrer=v.referrer,
                                      user_agent=v.user_agent, utm_source=v.utm_source, count=v.count)
                     for v in visits[start:start + UPLOAD_BATCH]]
            reply = await stub.RecordReferralVisits(pb.RecordReferralVisitsRequest(project=name, visits=batch),
                                                    metadata=metadata, timeout=SERVICE_TIMEOUT_S)
            accepted, duplicates = accepted + reply.accepted, duplicates + reply.duplicates
            rejected.update(r.reason for r in reply.rejected)
        now = time.time()
        report = await stub.GetReferralTraffic(pb.GetReferralTrafficRequest(
            project=name, start_time=timestamp_pb2.Timestamp(seconds=int(now - days * 86_400))),
            metadata=metadata, timeout=SERVICE_TIMEOUT_S)
        return accepted, duplicates, rejected, report

    accepted, duplicates, rejected, report = _call(ctx, action)
    if as_json:
        _json(report)
        return
    if visits or bad:
        out.print(f"ingested {accepted} visits ({duplicates} already recorded, {sum(rejected.values())} rejected by "
                  f"the service, {bad} unreadable lines)")
        if rejected:
            out.print("rejected: " + ", ".join(f"{reason} x{n}" for reason, n in rejected.most_common()))
    table = Table("engine", "visits", title=f"AI referral visits, last {days} days")
    for engine, count in sorted(report.totals_by_engine.items(), key=lambda item: -item[1]):
        table.add_row(engine, str(count))
    out.print(table)
    out.print(f"AI referrals are {report.ai_share_of_visits:.1%} of recorded visits. {report.lower_bound_note}")
    if report.crawlers:
        bots = Table("AI crawler (unverified)", "operator", "purpose", "fetches")
        for crawler in report.crawlers:
            bots.add_row(crawler.token, crawler.operator, crawler.purpose, str(crawler.fetches))
        out.print(bots)


# --- report -------------------------------------------------------------------------------------


@cli.command()
@click.argument("project_id")
@click.option("--out", "directory", type=click.Path(path_type=Path, file_okay=False), default=Path("visibility-report"),
              show_default=True, help="Folder for report.html and the CSV/JSON exports.")
@click.option("--days", type=click.IntRange(1, 3650), default=90, show_default=True, help="Window of the trends.")
@click.pass_context
def report(ctx: click.Context, project_id: str, directory: Path, days: int) -> None:
    """Write a self-contained HTML report with plots, plus CSV and JSON exports."""
    from llmo.visibility.report import render_html, write_exports

    name = _project_name(project_id)

    async def action(stub: Any, metadata: list[tuple[str, str]]) -> Any:
        return await collect_report(stub, metadata, name, days)

    data = _call(ctx, action)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "report.html"
    path.write_text(render_html(data), encoding="utf-8")
    exports = write_exports(data, directory)
    out.print(f"wrote {path} and {len(exports)} exports in {directory}")


async def collect_report(stub: Any, metadata: list[tuple[str, str]], name: str, days: int) -> Any:
    """Everything the report shows, read from the service."""
    import grpc
    from google.protobuf import timestamp_pb2

    from llmo.protos.visibility.v1 import visibility_service_pb2 as pb
    from llmo.visibility.report import ReportData

    def iso(stamp: Any) -> str:
        return stamp.ToDatetime(tzinfo=UTC).isoformat()

    project = (await stub.GetProject(pb.GetProjectRequest(name=name), metadata=metadata,
                                     timeout=SERVICE_TIMEOUT_S)).project
    data = ReportData(project=name, brand=project.brand.name, generated=datetime.now(UTC))
    start = timestamp_pb2.Timestamp(seconds=int(time.time() - days * 86_400))
    trend = await stub.GetShareOfVoiceTrend(pb.GetShareOfVoiceTrendRequest(project=name, start_time=start),
                                            metadata=metadata, timeout=SERVICE_TIMEOUT_S)
    data.trend = [(iso(p.bucket_start_time), p.engine, p.brand, p.mention_share.estimate, p.mention_share.low,
                   p.mention_share.high) for p in trend.points]
    runs = (await stub.ListShareOfVoiceRuns(pb.ListShareOfVoiceRunsRequest(parent=name), metadata=metadata,
                                            timeout=SERVICE_TIMEOUT_S)).share_of_voice_runs
    latest = next((r for r in runs if r.state == pb.JOB_STATE_SUCCEEDED), None)
    if latest is not None:
        data.run = latest.name
        data.shares = [(e.engine, b.brand, b.is_project_brand, b.mention_rate.estimate, b.mention_rate.low,
                        b.mention_rate.high, b.mention_share.estimate, b.mention_share.low, b.mention_share.high,
                        b.citation_rate.estimate) for e in latest.engine_shares for b in e.brands]
        gaps = await stub.ListCoverageGaps(pb.ListCoverageGapsRequest(parent=name, page_size=1000,
                                                                      share_of_voice_run=latest.name),
                                           metadata=metadata, timeout=SERVICE_TIMEOUT_S)
        data.gaps = [(g.query, pb.GapKind.Name(g.kind).removeprefix("GAP_KIND_"), g.opportunity, ", ".join(g.engines),
                      ", ".join(g.competitors_present), g.best_page_url, g.best_page_similarity, g.recommendation)
                     for g in gaps.coverage_gaps]
    crawls = (await stub.ListCrawls(pb.ListCrawlsRequest(parent=name), metadata=metadata,
                                    timeout=SERVICE_TIMEOUT_S)).crawls
    crawl = next((c for c in crawls if c.state == pb.JOB_STATE_SUCCEEDED), None)
    if crawl is not None:
        data.crawl = crawl.name
        sources = crawl.summary.mention_sources
        data.third_party_mentions = crawl.summary.third_party_mentions if sources else None
        data.mention_sources = [(m.url, m.error_reason or str(m.http_status), m.mentions_brand, m.matched,
                                 ", ".join(m.competitors)) for m in sources]
        token = ""
        while True:
            reply = await stub.ListPages(pb.ListPagesRequest(parent=crawl.name, page_size=1000, page_token=token),
                                         metadata=metadata, timeout=SERVICE_TIMEOUT_S)
            for page in reply.pages:
                if page.error_reason:
                    continue
                pillars = page.score.pillars
                data.pages.append((page.url, page.score.overall, pillars.relevance if pillars.relevance_applicable
                                   else None, pillars.authority, pillars.clarity, pillars.quality,
                                   page.score.findings[0].code if page.score.findings else ""))
            token = reply.next_page_token
            if not token:
                break
    try:
        traffic = await stub.GetReferralTraffic(pb.GetReferralTrafficRequest(project=name, start_time=start),
                                                metadata=metadata, timeout=SERVICE_TIMEOUT_S)
    except grpc.aio.AioRpcError:  # pragma: no cover - the report still shows the rest
        traffic = pb.GetReferralTrafficResponse()
    data.referrals = [(iso(b.bucket_start_time), b.engine, b.visits) for b in traffic.buckets]
    data.referral_totals = dict(traffic.totals_by_engine)
    data.ai_share_of_visits = traffic.ai_share_of_visits
    data.crawlers = [(c.token, c.operator, c.purpose, c.fetches) for c in traffic.crawlers]
    data.lower_bound_note = traffic.lower_bound_note
    return data


# --- offline extraction benchmark ---------------------------------------------------------------


@cli.command("extract-eval")
@click.option("--data", "data_dir", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder with html/*.html.gz and ground-truth.json (ScrapingHub article-extraction layout).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
def extract_eval(data_dir: Path, as_json: bool) -> None:
    """Precision, recall and F1 of our main-content extraction (the benchmark's token-level definition)."""
    from llmo.visibility.extraction_eval import evaluate_extractor, load_benchmark, our_extractor

    try:
        items = load_benchmark(data_dir)
    except ValueError as error:
        raise InputError(str(error)) from error
    with Progress(TextColumn("extracting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                  transient=True) as progress:
        task = progress.add_task("", total=len(items))

        def extract(html: bytes, url: str) -> str:
            text = our_extractor(html, url)
            progress.advance(task)
            return text

        result = evaluate_extractor(items, extract)
    figures = {"items": result.items, "precision": round(result.precision, 4), "recall": round(result.recall, 4),
               "f1": round(result.f1, 4), "micro_precision": round(result.micro_precision, 4),
               "micro_recall": round(result.micro_recall, 4), "micro_f1": round(result.micro_f1, 4)}
    if as_json:
        out.print_json(json.dumps(figures))
        return
    table = Table("items", "precision", "recall", "F1", "micro F1", title=f"Main-content extraction on {data_dir}")
    table.add_row(str(result.items), f"{result.precision:.3f}", f"{result.recall:.3f}", f"{result.f1:.3f}",
                  f"{result.micro_f1:.3f}")
    out.print(table)
