"""The four-pillar page score: each finding appears exactly when its rule says, scores stay in range."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from llmo.visibility.extract import ExtractedPage, extract_page
from llmo.visibility.page_scores import (
    PILLARS,
    BrandFacts,
    PageScore,
    ScoringContext,
    score_page,
)

NOW = datetime(2025, 4, 1, 12, 0, tzinfo=UTC)
URL = "https://www.acme.example/guides/heat-pumps"

BRAND = BrandFacts(
    name="Acme Energy",
    aliases=["Acme"],
    description="Acme Energy installs heat pumps and solar panels for homes.",
    same_as=["https://linkedin.com/company/acme-energy/", "https://en.wikipedia.org/wiki/Acme_Energy"],
    logo="https://cdn.acme.example/brand/logo.png",
    domains=["acme.example"],
)

GOOD = """<!DOCTYPE html><html lang="en"><head>
<title>How heat pumps cut home heating bills | Acme Energy</title>
<script type="application/ld+json">
{"@context": "https://schema.org", "@graph": [
  {"@type": "Organization", "name": "Acme Energy Ltd", "url": "https://acme.example/",
   "description": "Acme Energy installs heat pumps and solar panels for homes in the UK.",
   "logo": "https://acme.example/logo.png",
   "sameAs": ["https://www.linkedin.com/company/acme-energy", "https://en.wikipedia.org/wiki/Acme_Energy"]},
  {"@type": "Article", "headline": "How heat pumps cut home heating bills",
   "author": {"@type": "Person", "name": "Jane Doe"},
   "datePublished": "2024-11-02T08:00:00Z", "dateModified": "2025-03-20T08:00:00Z"},
  {"@type": "FAQPage", "mainEntity": [
    {"@type": "Question", "name": "Do heat pumps work in winter?",
     "acceptedAnswer": {"@type": "Answer", "text": "Yes, modern units heat homes well below freezing."}}]}
]}
</script></head>
<body><nav><a href="/">Home</a> <a href="/shop">Shop</a></nav>
<main><article>
<h1>How heat pumps cut home heating bills</h1>
<p>By <a rel="author" href="/team/jane">Jane Doe</a>. Last updated: March 20, 2025</p>
<p>A heat pump moves heat from the outside air into your home instead of burning fuel to make it. According to
the International Energy Agency, heat pumps are three to five times more efficient than gas boilers, which is
why they have become the default choice for new homes in much of northern Europe over the last decade.</p>
<h2>How much can you save?</h2>
<p>Savings depend on your current fuel, your insulation and the electricity tariff you pay. A study by the Energy
Saving Trust found that a typical detached house switching from an old oil boiler saves about £1,200 a year, a
drop of 35% in running costs. Homes moving off mains gas save less, usually between £100 and £300 a year, and
the payback period stretches to 8 years or more <a href="https://www.energysavingtrust.org.uk/heat-pumps">[source]</a>.</p>
<ul><li>Old oil boiler: largest savings</li><li>Electric storage heaters: large savings</li>
<li>Modern gas boiler: small savings</li></ul>
<h2>What does installation involve?</h2>
<p>An installer surveys the house, calculates the heat loss room by room and sizes the unit accordingly. Most
installations take 2 days and need a hot water cylinder and sometimes larger radiators. The government grant
of £7,500 is paid to the installer directly, as reported by the BBC in 2024 [1]. Ofgem said that more than
forty thousand grants were issued in the first year of the scheme, and uptake grew 40% in the second.</p>
<table><tr><th>Home type</th><th>Typical unit</th><th>Installed cost</th></tr>
<tr><td>Flat</td><td>5 kW</td><td>£8,000</td></tr><tr><td>Semi-detached</td><td>8 kW</td><td>£11,000</td></tr></table>
<h3>Do heat pumps work in winter?</h3>
<p>Yes. Modern air source units keep working down to minus 20 degrees, although their efficiency falls as the
outside temperature drops, which is why installers size them for the coldest week of a typical year rather than
for an average day, and why good insulation matters as much as the unit itself for the final running costs.</p>
<p>Official guidance is on <a href="https://www.gov.uk/apply-boiler-upgrade-scheme">gov.uk</a>.</p>
</article></main>
<footer><p>Copyright 2025 Acme Energy.</p></footer></body></html>
"""

SKIPPED_HEADINGS = """<html><head><title>Heat pump sizing explained simply</title></head><body>
<h1>Heat pump sizing</h1><h4>Heat loss</h4><p>Each room loses heat through its walls and windows.</p>
<h2>Flow temperature</h2><h4>Radiators</h4><p>Bigger radiators allow a lower flow temperature.</p>
</body></html>"""

NO_TITLE_NO_H1 = """<html><head></head><body><div><p>Heat pumps move heat from outside air into your home and
are efficient.</p></div></body></html>"""

BROKEN_JSON_LD = """<html><head><title>Heat pump grants in 2025</title>
<script type="application/ld+json">{"@type": "Organization", "name": "Acme Energy",,}</script>
</head><body><h1>Heat pump grants</h1><p>Grants cover part of the cost.</p></body></html>"""

NOINDEX = """<html><head><title>Internal heat pump price list</title><meta name="robots" content="noindex, follow">
</head><body><h1>Price list</h1><p>Prices for installers only.</p></body></html>"""


def _page(html: str, url: str = URL) -> ExtractedPage:
    return extract_page(html, url)


def _score(page: ExtractedPage, **kwargs: object) -> PageScore:
    kwargs.setdefault("now", NOW)
    return score_page(page, ScoringContext(**kwargs))  # type: ignore[arg-type]


def _codes(score: PageScore) -> set[str]:
    return {f.code for f in score.findings}


def _signal(score: PageScore, pillar: str, name: str) -> float:
    return next(s.score for s in score.pillars[pillar].signals if s.name == name)


def _check_invariants(score: PageScore) -> None:
    assert set(score.pillars) == set(PILLARS)
    assert 0 <= score.overall <= 100
    for pillar in score.pillars.values():
        assert pillar.score is None or 0 <= pillar.score <= 100
        assert all(0 <= s.score <= 100 for s in pillar.signals)
        if pillar.signals:
            assert sum(s.weight for s in pillar.signals) == pytest.approx(1.0)
    impacts = [f.impact for f in score.findings]
    assert impacts == sorted(impacts, reverse=True)
    for finding in score.findings:
        assert finding.pillar in (*PILLARS, "blockers")
        assert finding.severity in ("info", "warning", "critical")
        assert finding.code.isupper() and " " not in finding.code
        assert finding.message.strip() and finding.recommendation.strip()
        assert finding.impact > 0


@pytest.fixture(scope="module")
def good() -> ExtractedPage:
    return _page(GOOD)


def test_good_page_scores_high_without_structural_findings(good: ExtractedPage) -> None:
    score = _score(good, brand=BRAND, prompt_similarity=[0.72, 0.61], third_party_mentions=25,
                   sitemap_lastmod=datetime(2025, 3, 20, tzinfo=UTC))
    _check_invariants(score)
    assert score.overall >= 80
    assert not _codes(score) & {
        "NO_H1", "MULTIPLE_H1", "HEADING_LEVELS_SKIPPED", "MISSING_TITLE", "TITLE_LENGTH", "STALE_CONTENT",
        "FRESHNESS_SIGNALS_DISAGREE", "NO_DATES", "ENTITY_INCONSISTENT", "MISSING_ORGANIZATION_SCHEMA",
        "NO_AUTHOR", "INVALID_JSON_LD", "MISSING_JSON_LD", "NOINDEX", "AI_BOTS_BLOCKED", "HTTP_ERROR",
        "LOW_PROMPT_COVERAGE", "NO_FAQ", "NO_LISTS_OR_TABLES", "FEW_CITATIONS", "FEW_STATISTICS",
    }
    assert _signal(score, "clarity", "faq") == 100


def test_relevance_is_excluded_without_prompts(good: ExtractedPage) -> None:
    no_prompts: tuple[list[float] | None, ...] = (None, [])
    for prompts in no_prompts:
        score = _score(good, brand=BRAND, prompt_similarity=prompts)
        assert score.pillars["relevance"].score is None
        others = [score.pillars[p].score for p in ("authority", "clarity", "quality")]
        assert score.overall == pytest.approx(sum(others) / 3, abs=0.051)  # type: ignore[arg-type]
        assert all(f.pillar != "relevance" for f in score.findings)


def test_relevance_findings_follow_prompt_similarity(good: ExtractedPage) -> None:
    low = _score(good, prompt_similarity=[0.1, 0.2, 0.3, 0.55])
    assert {"LOW_PROMPT_COVERAGE", "LOW_PROMPT_SIMILARITY"} <= _codes(low)
    assert low.pillars["relevance"].score is not None and low.pillars["relevance"].score < 40
    high = _score(good, prompt_similarity=[0.8, 0.7])
    assert high.pillars["relevance"].score == 100
    assert not _codes(high) & {"LOW_PROMPT_COVERAGE", "LOW_PROMPT_SIMILARITY"}


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"noindex": True}, "NOINDEX"),
        ({"ai_bots_blocked": ["GPTBot", "PerplexityBot"]}, "AI_BOTS_BLOCKED"),
        ({"http_status": 404}, "HTTP_ERROR"),
        ({"http_status": 503}, "HTTP_ERROR"),
    ],
)
def test_blockers_cap_the_overall_score(good: ExtractedPage, kwargs: dict[str, object], code: str) -> None:
    free = _score(good, brand=BRAND)
    blocked = _score(good, brand=BRAND, **kwargs)
    _check_invariants(blocked)
    assert free.overall > 20 and blocked.overall == 20
    assert blocked.findings[0].code == code
    assert blocked.findings[0].pillar == "blockers" and blocked.findings[0].severity == "critical"
    assert blocked.pillars == free.pillars  # a blocker caps the total, it does not rescore the pillars
    assert not _codes(free) & {"NOINDEX", "AI_BOTS_BLOCKED", "HTTP_ERROR"}


def test_blocker_messages_name_the_bots(good: ExtractedPage) -> None:
    score = _score(good, ai_bots_blocked=["GPTBot"])
    finding = next(f for f in score.findings if f.code == "AI_BOTS_BLOCKED")
    assert "GPTBot" in finding.message and "GPTBot" in finding.recommendation


def test_meta_noindex_on_the_page_is_a_blocker() -> None:
    score = _score(_page(NOINDEX))
    assert "NOINDEX" in _codes(score) and score.overall <= 20
    assert "HTTP_ERROR" not in _codes(_score(_page(NOINDEX), http_status=301))


def test_missing_title_and_h1() -> None:
    score = _score(_page(NO_TITLE_NO_H1))
    _check_invariants(score)
    assert {"MISSING_TITLE", "NO_H1"} <= _codes(score)
    assert _signal(score, "clarity", "title") == 0


def test_title_length_and_multiple_h1(good: ExtractedPage) -> None:
    page = replace(good, title="x" * 90, headings=[(1, "One"), (1, "Two"), (2, "Three")])
    codes = _codes(_score(page))
    assert {"TITLE_LENGTH", "MULTIPLE_H1"} <= codes and "MISSING_TITLE" not in codes


def test_skipped_heading_levels() -> None:
    score = _score(_page(SKIPPED_HEADINGS))
    finding = next(f for f in score.findings if f.code == "HEADING_LEVELS_SKIPPED")
    assert "H1 -> H4" in finding.message
    assert _signal(score, "clarity", "heading_hierarchy") == 10  # two skips: H1 -> H4 and H2 -> H4
    nested = _page(SKIPPED_HEADINGS.replace("h4>", "h2>"))
    assert "HEADING_LEVELS_SKIPPED" not in _codes(_score(nested))


def test_long_page_without_subheadings(good: ExtractedPage) -> None:
    page = replace(good, headings=[(1, "Only a title")], word_count=800)
    assert "NO_SUBHEADINGS" in _codes(_score(page))


def test_short_fragments_are_not_answer_passages(good: ExtractedPage) -> None:
    page = replace(good, passages=["Intro\nToo short.", "Heading\nAlso short.", "H\n" + "word " * 60])
    score = _score(page)
    assert "FEW_ANSWER_PASSAGES" in _codes(score)
    assert _signal(score, "clarity", "passage_self_containment") == pytest.approx(33.3)


def test_stale_and_fresh_content(good: ExtractedPage) -> None:
    stale = replace(good, date_modified=NOW - timedelta(days=800), last_updated_text=None,
                    date_published=NOW - timedelta(days=900))
    stale_score = _score(stale)
    assert "STALE_CONTENT" in _codes(stale_score)
    assert _signal(stale_score, "quality", "freshness") == 0
    a_year = replace(stale, date_modified=NOW - timedelta(days=366))
    assert "STALE_CONTENT" in _codes(_score(a_year))
    fresh = replace(stale, date_modified=NOW - timedelta(days=30))
    assert "STALE_CONTENT" not in _codes(_score(fresh))
    assert _signal(_score(fresh), "quality", "freshness") == 100


def test_visible_last_updated_counts_for_freshness(good: ExtractedPage) -> None:
    page = replace(good, date_modified=None, date_published=NOW - timedelta(days=900),
                   last_updated_text=NOW - timedelta(days=10))
    assert "STALE_CONTENT" not in _codes(_score(page))


def test_conflicting_freshness_signals(good: ExtractedPage) -> None:
    conflicting = _score(good, sitemap_lastmod=datetime(2025, 1, 2, tzinfo=UTC))
    finding = next(f for f in conflicting.findings if f.code == "FRESHNESS_SIGNALS_DISAGREE")
    assert "sitemap lastmod 2025-01-02" in finding.message and "dateModified 2025-03-20" in finding.message
    agreeing = _score(good, sitemap_lastmod=datetime(2025, 3, 21), http_last_modified=datetime(2025, 3, 19, 8))
    assert "FRESHNESS_SIGNALS_DISAGREE" not in _codes(agreeing)  # naive datetimes are read as UTC
    header_only = _score(good, http_last_modified=datetime(2025, 3, 30, tzinfo=UTC))
    assert "FRESHNESS_SIGNALS_DISAGREE" in _codes(header_only)


def test_page_without_dates(good: ExtractedPage) -> None:
    undated = replace(good, date_published=None, date_modified=None, last_updated_text=None)
    codes = _codes(_score(undated))
    assert {"NO_DATES", "FRESHNESS_UNKNOWN"} <= codes
    from_sitemap = _score(undated, sitemap_lastmod=NOW - timedelta(days=500))
    assert "STALE_CONTENT" in _codes(from_sitemap) and "FRESHNESS_UNKNOWN" not in _codes(from_sitemap)


def test_entity_consistency_against_the_brand(good: ExtractedPage) -> None:
    matching = _score(good, brand=BRAND)
    assert _signal(matching, "authority", "entity_consistency") == 100
    other_brand = BrandFacts(name="Globex", description="Globex sells industrial chemicals worldwide.",
                             same_as=["https://www.crunchbase.com/organization/globex"], logo="https://globex.example/g.svg")
    mismatch = _score(good, brand=other_brand)
    finding = next(f for f in mismatch.findings if f.code == "ENTITY_INCONSISTENT")
    assert '"Globex"' in finding.recommendation
    assert "https://www.crunchbase.com/organization/globex" in finding.recommendation
    assert finding.pillar == "authority"


def test_missing_organization_uses_the_site_entity(good: ExtractedPage) -> None:
    orphan = replace(good, organization=None)
    assert "MISSING_ORGANIZATION_SCHEMA" in _codes(_score(orphan, brand=BRAND))
    site_org = dict(good.organization or {})
    inherited = _score(orphan, brand=BRAND, site_organization=site_org)
    assert "MISSING_ORGANIZATION_SCHEMA" not in _codes(inherited)
    assert _signal(inherited, "authority", "entity_consistency") == 100


def test_page_entity_disagreeing_with_the_site_entity(good: ExtractedPage) -> None:
    site_org = {**(good.organization or {}), "name": "Acme Holdings"}
    score = _score(good, brand=BRAND, site_organization=site_org)
    assert _signal(score, "authority", "entity_consistency") == 70


def test_authority_without_author_or_mentions() -> None:
    score = _score(_page(SKIPPED_HEADINGS), third_party_mentions=0)
    assert {"NO_AUTHOR", "MISSING_ORGANIZATION_SCHEMA", "FEW_THIRD_PARTY_MENTIONS", "THIN_CONTENT"} <= _codes(score)
    many = _score(_page(SKIPPED_HEADINGS), third_party_mentions=20)
    assert "FEW_THIRD_PARTY_MENTIONS" not in _codes(many)


def test_structured_data_findings() -> None:
    broken = _score(_page(BROKEN_JSON_LD))
    assert "INVALID_JSON_LD" in _codes(broken) and "MISSING_JSON_LD" not in _codes(broken)
    none = _score(_page(SKIPPED_HEADINGS))
    assert "MISSING_JSON_LD" in _codes(none) and "INVALID_JSON_LD" not in _codes(none)


def test_evidence_findings_on_a_page_without_evidence() -> None:
    codes = _codes(_score(_page(SKIPPED_HEADINGS)))
    assert {"FEW_STATISTICS", "FEW_CITATIONS", "FEW_ATTRIBUTED_CLAIMS", "NO_LISTS_OR_TABLES", "NO_FAQ"} <= codes


def test_impact_is_the_weight_share_of_the_lost_points() -> None:
    score = _score(_page(NO_TITLE_NO_H1))
    finding = next(f for f in score.findings if f.code == "MISSING_TITLE")
    signal = next(s for s in score.pillars["clarity"].signals if s.name == "title")
    assert finding.impact == pytest.approx(signal.weight * (100 - signal.score))
    clarity = score.pillars["clarity"]
    expected = sum(s.weight * s.score for s in clarity.signals)
    assert clarity.score == pytest.approx(expected, abs=0.051)


def test_worst_pages_stay_in_range() -> None:
    for html in ("", NO_TITLE_NO_H1, SKIPPED_HEADINGS, BROKEN_JSON_LD, NOINDEX):
        score = _score(_page(html), prompt_similarity=[-0.2, 0.0], noindex=True, ai_bots_blocked=["GPTBot"],
                       http_status=500, third_party_mentions=-3)
        _check_invariants(score)
        assert score.overall <= 20


def test_scoring_is_deterministic(good: ExtractedPage) -> None:
    context = ScoringContext(brand=BRAND, prompt_similarity=[0.4, 0.6], now=NOW)
    assert score_page(good, context) == score_page(good, context)


def test_third_party_mentions_left_out_when_not_counted() -> None:
    """Regression: an uncounted signal once scored as zero mentions on every crawled page."""
    unknown = _score(_page(SKIPPED_HEADINGS))
    counted = _score(_page(SKIPPED_HEADINGS), third_party_mentions=0)
    names = {s.name for s in unknown.pillars["authority"].signals}
    assert "third_party_mentions" not in names
    assert "FEW_THIRD_PARTY_MENTIONS" not in {f.code for f in unknown.findings}
    assert "FEW_THIRD_PARTY_MENTIONS" in {f.code for f in counted.findings}
    assert abs(sum(s.weight for s in unknown.pillars["authority"].signals) - 1.0) < 1e-3
