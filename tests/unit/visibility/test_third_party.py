"""Third-party mention sources, the pure parts: which URLs a crawl reads, what one page's text says
(through the share-of-voice mention detector), the count that becomes the authority signal, the count a
stored page was scored with, the project checks, and how the report and the CLI show the sources."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console

from llmo.core.errors import ServiceError
from llmo.protos.visibility.v1 import visibility_service_pb2 as pb
from llmo.visibility.cli import _sources_table
from llmo.visibility.crawl import scored_mentions
from llmo.visibility.mentions import MentionDetector
from llmo.visibility.report import ReportData, render_html, write_exports
from llmo.visibility.sov_runs import brands_of
from llmo.visibility.third_party import (
    ELLIPSIS,
    SNIPPET_CHARS,
    distinct_sources,
    mentions_count,
    read_source,
    snippet,
)
from llmo.visibility.validate import check_project


def acme(**fields: object) -> pb.Project:
    fields.setdefault("brand", pb.Brand(name="Acme", aliases=["Acme Corp"]))
    fields.setdefault("domains", ["acme.example"])
    fields.setdefault("competitors", [pb.Competitor(name="Globex"), pb.Competitor(name="Initech", aliases=["INTC"])])
    return pb.Project(**fields)  # type: ignore[arg-type]


@pytest.fixture
def detector() -> MentionDetector:
    return MentionDetector(brands_of(acme()))


def test_sources_are_normalised_and_each_read_once_in_order() -> None:
    assert distinct_sources(["https://Reviews.example/acme#top", "https://news.example/a?utm_source=x&b=1",
                             "https://reviews.example/acme", "mailto:x@y.z", "https://news.example/a?b=1"]) == [
        "https://reviews.example/acme", "https://news.example/a?b=1"]
    assert distinct_sources([]) == []


def test_a_page_naming_the_brand_by_an_alias_is_a_mention_with_its_context(detector: MentionDetector) -> None:
    text = "Best anvils of 2025\nWe tested six suppliers. Initech was slow; ACME CORP shipped in two days, " \
           "and Globex came second. Acme's anvils last."
    source = read_source("https://reviews.example/anvils", text, detector, "Acme")
    assert source.mentions_brand and source.brand_mentions == 2
    assert source.matched == "ACME CORP"  # the longest form wins, as written
    assert "ACME CORP shipped in two days" in source.snippet and source.url == "https://reviews.example/anvils"
    assert list(source.competitors) == ["Initech", "Globex"]  # in order of first mention


def test_a_page_that_does_not_name_the_brand_is_no_mention(detector: MentionDetector) -> None:
    # "Acmeville" is another word and text inside a URL is a citation, not a mention.
    text = "Hotels in Acmeville. Globex reviewed at https://acme.example/review and www.acme.example."
    source = read_source("https://travel.example/", text, detector, "Acme")
    assert not source.mentions_brand and source.brand_mentions == 0
    assert source.matched == "" and source.snippet == "" and list(source.competitors) == ["Globex"]
    assert not read_source("https://empty.example/", "", detector, "Acme").mentions_brand


def test_the_snippet_is_bounded_and_cut_between_words() -> None:
    words = " ".join(f"word{i}" for i in range(200))
    text = f"{words} Acme   makes\n anvils {words}"
    start = text.index("Acme")
    cut = snippet(text, start, start + 4)
    assert len(cut) <= SNIPPET_CHARS and cut.startswith(ELLIPSIS) and cut.endswith(ELLIPSIS)
    assert "Acme makes anvils" in cut  # whitespace collapsed
    assert all(w.startswith("word") for w in cut.strip(ELLIPSIS).replace("Acme makes anvils", "").split())
    assert snippet("Acme rocks", 0, 4) == "Acme rocks"  # nothing cut: no ellipsis
    huge = "A" * 1000
    assert len(snippet(huge, 0, 1000)) <= SNIPPET_CHARS


def test_the_count_is_none_without_sources_and_counts_only_brand_mentions() -> None:
    assert mentions_count([]) is None
    sources = [pb.MentionSource(mentions_brand=True), pb.MentionSource(error_reason="HTTP_ERROR"),
               pb.MentionSource(mentions_brand=False), pb.MentionSource(mentions_brand=True)]
    assert mentions_count(sources) == 2
    assert mentions_count([pb.MentionSource(error_reason="ROBOTS_DISALLOWED")]) == 0


def test_a_stored_page_says_which_count_it_was_scored_with() -> None:
    page = pb.Page(score=pb.PageScore(signals=[pb.Signal(name="author_present", value=1.0)]))
    assert scored_mentions(page) is None
    page.score.signals.append(pb.Signal(name="third_party_mentions", value=3.0))
    assert scored_mentions(page) == 3


@pytest.mark.parametrize("sources", [
    ["reviews.example/acme"],  # not absolute
    ["ftp://reviews.example/acme"],
    ["https://"],
    ["https://reviews.example/" + "a" * 2048],
    ["https://acme.example/press"],  # the brand's own domain
    ["https://blog.acme.example/post"],  # a subdomain of it
    ["https://reviews.example/ok", "javascript:alert(1)"],
    [f"https://site{i}.example/" for i in range(201)],
])
def test_bad_mention_sources_are_refused(sources: list[str]) -> None:
    with pytest.raises(ServiceError) as raised:
        check_project(acme(mention_sources=sources))
    assert raised.value.reason == "INVALID_MENTION_SOURCE"


def test_good_mention_sources_pass() -> None:
    check_project(acme(mention_sources=[f"https://site{i}.example/acme" for i in range(200)]))
    check_project(acme(mention_sources=["http://localhost:8080/review", "https://acme.example.org/"]))
    check_project(acme(mention_sources=["https://reviews.example/" + "a" * 2000]))


def test_the_report_and_the_cli_show_the_sources(tmp_path: Path) -> None:
    sources = [("https://reviews.example/acme", "200", True, "Acme Corp", "Globex"),
               ("https://dir.example/", "200", False, "", "Initech"), ("https://gone.example/", "HTTP_ERROR", False, "",
                                                                       "")]
    data = ReportData(project="projects/acme", brand="Acme", generated=datetime(2026, 1, 9, tzinfo=UTC),
                      third_party_mentions=1, mention_sources=sources)
    page = render_html(data)
    assert "<h3>Third-party mentions</h3><p>1 of 3 mention sources name the brand.</p>" in page
    assert "https://reviews.example/acme" in page and "HTTP_ERROR" in page
    assert "Third-party mentions" not in render_html(ReportData(project="p", brand="Acme",
                                                                generated=datetime(2026, 1, 9, tzinfo=UTC)))
    write_exports(data, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["third_party_mentions"] == 1 and report["mention_sources"][0] == {
        "url": "https://reviews.example/acme", "status": "200", "mentions_brand": True, "matched": "Acme Corp",
        "competitors": "Globex"}

    summary = pb.CrawlSummary(third_party_mentions=1, mention_sources=[
        pb.MentionSource(url="https://reviews.example/acme", http_status=200, mentions_brand=True, matched="Acme Corp",
                         competitors=["Globex"]),
        pb.MentionSource(url="https://private.example/x", error_reason="ROBOTS_DISALLOWED")])
    console = Console(width=200, record=True)
    console.print(_sources_table(summary))
    shown = console.export_text()
    assert "Third-party mentions: 1 of 2 sources name the brand" in shown
    assert "ROBOTS_DISALLOWED" in shown and "Acme Corp" in shown and "Globex" in shown
