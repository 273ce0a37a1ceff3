"""Rows of the store and results of the analysis modules to and from `llmo.visibility.v1` messages."""

from __future__ import annotations

import hashlib
import uuid

from llmo.core.resources import timestamp
from llmo.protos.common.v1 import common_pb2
from llmo.protos.visibility.v1 import visibility_service_pb2 as pb
from llmo.visibility.page_scores import PageScore
from llmo.visibility.sov_stats import BrandMetrics, Interval
from llmo.visibility.storage import CrawlRow, ProjectRow, RunRow

PILLAR_ENUM = {"relevance": pb.PILLAR_RELEVANCE, "authority": pb.PILLAR_AUTHORITY, "clarity": pb.PILLAR_CLARITY,
               "quality": pb.PILLAR_QUALITY, "blockers": pb.PILLAR_TECHNICAL}
SEVERITY_ENUM = {"info": pb.SEVERITY_INFO, "warning": pb.SEVERITY_WARNING, "critical": pb.SEVERITY_CRITICAL}


def new_etag() -> str:
    return uuid.uuid4().hex[:16]


def page_id(canonical_url: str) -> str:
    """The contract's page id: the hex SHA-256 prefix (16 chars) of the canonical URL."""
    return hashlib.sha256(canonical_url.encode()).hexdigest()[:16]


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:32]


def usd(micros: int) -> common_pb2.Money:
    return common_pb2.Money(currency_code="USD", micros=micros)


def project_proto(row: ProjectRow) -> pb.Project:
    project = pb.Project.FromString(row.body)
    project.name = f"projects/{row.project_id}"
    project.etag = row.etag
    project.query_set_version = row.query_set_version
    project.create_time.CopyFrom(timestamp(row.create_us))
    project.update_time.CopyFrom(timestamp(row.update_us))
    return project


def project_queries(project: pb.Project) -> list[tuple[str, float]]:
    """The tracked queries with their demand weights (`queries`, then the deprecated `tracked_queries`)."""
    seen: dict[str, float] = {}
    for query in project.queries:
        if query.text.strip() and query.text not in seen:
            seen[query.text] = query.weight if query.weight > 0 else 1.0
    for text in project.tracked_queries:
        if text.strip() and text not in seen:
            seen[text] = 1.0
    return list(seen.items())


def crawl_proto(row: CrawlRow, project_id: str) -> pb.Crawl:
    crawl = pb.Crawl.FromString(row.spec)
    crawl.name = f"projects/{project_id}/crawls/{row.crawl_id}"
    crawl.state = row.state  # type: ignore[assignment]
    crawl.progress.CopyFrom(pb.CrawlProgress(
        pages_discovered=row.discovered, pages_fetched=row.fetched, pages_failed=row.failed,
        pages_disallowed=row.disallowed, pages_queued=row.queued if row.state in (1, 2) else 0,
        pages_trapped=row.trapped, pages_unchanged=row.unchanged))
    if row.summary:
        crawl.summary.CopyFrom(pb.CrawlSummary.FromString(row.summary))
    crawl.error_reason, crawl.error_message = row.error_reason, row.error_message
    crawl.create_time.CopyFrom(timestamp(row.create_us))
    if row.start_us:
        crawl.start_time.CopyFrom(timestamp(row.start_us))
    if row.end_us:
        crawl.end_time.CopyFrom(timestamp(row.end_us))
    return crawl


def score_proto(score: PageScore) -> pb.PageScore:
    out = pb.PageScore(overall=round(score.overall, 3))
    pillars = score.pillars
    relevance = pillars.get("relevance")
    out.pillars.relevance_applicable = relevance is not None and relevance.score is not None
    for name in ("relevance", "authority", "clarity", "quality"):
        pillar = pillars.get(name)
        if pillar is not None and pillar.score is not None:
            setattr(out.pillars, name, round(pillar.score, 3))
        for signal in pillar.signals if pillar is not None else ():
            out.signals.append(pb.Signal(pillar=PILLAR_ENUM[name], name=signal.name, value=signal.value,
                                         score=round(signal.score, 3), weight=signal.weight, detail=signal.detail))
    for finding in score.findings:
        out.findings.append(pb.Finding(
            pillar=PILLAR_ENUM.get(finding.pillar, pb.PILLAR_UNSPECIFIED),
            severity=SEVERITY_ENUM.get(finding.severity, pb.SEVERITY_UNSPECIFIED), code=finding.code,
            message=finding.message, recommendation=finding.recommendation, impact=round(finding.impact, 3)))
    return out


def interval_proto(value: Interval) -> pb.Interval:
    return pb.Interval(estimate=value.estimate, low=value.low, high=value.high)


def brand_share_proto(metrics: BrandMetrics, mentions: int, citations: int) -> pb.BrandShare:
    return pb.BrandShare(
        brand=metrics.brand, is_project_brand=metrics.is_project_brand, mentions=mentions, citations=citations,
        share_of_voice=metrics.mention_sov.estimate, mean_position=metrics.mean_position or 0.0,
        mention_rate=interval_proto(metrics.mention_rate), mention_share=interval_proto(metrics.mention_sov),
        answer_share=interval_proto(metrics.answer_sov), citation_rate=interval_proto(metrics.citation_rate),
        citation_share=interval_proto(metrics.citation_share),
        position_weighted_share=interval_proto(metrics.position_weighted_sov),
        demand_weighted_share=interval_proto(metrics.demand_weighted_sov))


def run_proto(row: RunRow, project_id: str) -> pb.ShareOfVoiceRun:
    run = pb.ShareOfVoiceRun.FromString(row.spec)
    if row.outcome:
        run.MergeFrom(pb.ShareOfVoiceRun.FromString(row.outcome))
    run.name = f"projects/{project_id}/shareOfVoiceRuns/{row.run_id}"
    run.state = row.state  # type: ignore[assignment]
    run.progress.CopyFrom(pb.ShareOfVoiceProgress(answers_total=row.answers_total,
                                                  answers_completed=row.answers_completed,
                                                  answers_failed=row.answers_failed))
    run.error_reason, run.error_message = row.error_reason, row.error_message
    run.usage.CopyFrom(common_pb2.Usage(input_tokens=row.input_tokens, output_tokens=row.output_tokens))
    run.cost.CopyFrom(usd(row.cost_micros))
    run.create_time.CopyFrom(timestamp(row.create_us))
    if row.start_us:
        run.start_time.CopyFrom(timestamp(row.start_us))
    if row.end_us:
        run.end_time.CopyFrom(timestamp(row.end_us))
    return run
