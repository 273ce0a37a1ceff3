"""Time buckets and AI referral traffic reports over stored visits.

Visits are classified once, when recorded (`referrals.classify_referral` for the referring answer
engine, `referrals.classify_crawler` for AI crawler user agents), so a report only groups and counts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from llmo.core.resources import timestamp
from llmo.protos.visibility.v1 import visibility_service_pb2 as pb
from llmo.visibility.referrals import AI_CRAWLERS, LOWER_BOUND_NOTE
from llmo.visibility.storage import VisitRow

HOUR_US = 3_600_000_000


def bucket_start_us(us: int, granularity: int) -> int:
    """Start of the UTC hour, day or ISO week (Monday) holding `us`."""
    if granularity == pb.GRANULARITY_HOUR:
        return us - us % HOUR_US
    day = datetime.fromtimestamp(us / 1e6, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if granularity == pb.GRANULARITY_WEEK:
        day -= timedelta(days=day.weekday())
    return int(day.timestamp()) * 1_000_000


def referral_report(rows: Sequence[VisitRow], granularity: int, top_pages: int) -> pb.GetReferralTrafficResponse:
    out = pb.GetReferralTrafficResponse(lower_bound_note=LOWER_BOUND_NOTE)
    buckets: dict[tuple[int, str], int] = defaultdict(int)
    totals: dict[str, int] = defaultdict(int)
    pages: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    crawlers: dict[str, int] = defaultdict(int)
    human = 0
    for row in rows:
        if row.crawler:
            crawlers[row.crawler] += row.count
            continue
        human += row.count
        if not row.engine:
            continue
        buckets[(bucket_start_us(row.visit_us, granularity), row.engine)] += row.count
        totals[row.engine] += row.count
        pages[row.landing_url][row.engine] += row.count
    for (start, engine), visits in sorted(buckets.items()):
        out.buckets.append(pb.ReferralBucket(bucket_start_time=timestamp(start), engine=engine, visits=visits))
    out.totals_by_engine.update(totals)
    out.ai_share_of_visits = sum(totals.values()) / human if human else 0.0
    ranked = sorted(pages.items(), key=lambda item: (-sum(item[1].values()), item[0]))[:top_pages]
    for url, by_engine in ranked:
        page = pb.LandingPageTraffic(url=url, visits=sum(by_engine.values()))
        page.by_engine.update(by_engine)
        out.top_pages.append(page)
    for token, fetches in sorted(crawlers.items(), key=lambda item: (-item[1], item[0])):
        operator, purpose = AI_CRAWLERS.get(token, ("unknown", "unknown"))
        out.crawlers.append(pb.CrawlerActivity(token=token, operator=operator, purpose=purpose, fetches=fetches,
                                               verified=False))
    return out
