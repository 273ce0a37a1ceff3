"""extract_page on raw HTML: main content, structure, entities, dates, evidence and robustness."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest

from llmo.visibility import extract as extract_mod
from llmo.visibility.extract import ExtractedPage, decode_html, extract_page, site_key, split_passages

URL = "https://www.acme.example/guides/heat-pumps"

ARTICLE = """<!DOCTYPE html>
<html lang="en-GB">
<head>
<meta charset="utf-8">
<title>How heat pumps cut home heating bills | Acme Energy</title>
<meta name="author" content="Jane Doe">
<link rel="canonical" href="/guides/heat-pumps">
<script type="application/ld+json">
{"@context": "https://schema.org", "@graph": [
  {"@type": "Organization", "@id": "https://acme.example/#org", "name": "Acme Energy Ltd",
   "description": "Acme Energy installs heat pumps and solar panels for homes.",
   "url": "https://acme.example/", "logo": {"@type": "ImageObject", "url": "https://acme.example/logo.png"},
   "sameAs": ["https://www.linkedin.com/company/acme-energy", "https://en.wikipedia.org/wiki/Acme_Energy"],
   "foundingDate": "2009",
   "address": {"@type": "PostalAddress", "streetAddress": "1 High St", "addressLocality": "Leeds",
               "addressCountry": "GB"}},
  {"@type": ["Article", "BlogPosting"], "headline": "How heat pumps cut home heating bills",
   "author": {"@type": "Person", "name": "Jane Doe"},
   "publisher": {"@id": "https://acme.example/#org"},
   "datePublished": "2024-01-10T08:00:00Z", "dateModified": "2025-02-27T09:30:00+01:00"}
]}
</script>
</head>
<body>
<header><nav><a href="/">Home</a> <a href="/shop">Shop our boilers</a> <a href="/about">About us</a>
<a href="#main">Skip to content</a></nav></header>
<main id="main">
<article>
<h1>How heat pumps cut home heating bills</h1>
<p class="byline">By <a rel="author" href="/team/jane">Jane Doe</a>. Last updated: February 27, 2025</p>
<p>A heat pump moves heat from the outside air into your home instead of burning fuel to make it. According to the
International Energy Agency, heat pumps are three to five times more efficient than gas boilers, which is why
they have become the default choice for new homes in much of northern Europe over the last decade.</p>
<h2>How much can you save?</h2>
<p>Savings depend on your current fuel, your insulation and the electricity tariff you pay. A study by the Energy
Saving Trust found that a typical detached house switching from an old oil boiler saves about £1,200 a year, a
drop of 35% in running costs. Homes moving off mains gas save less, usually between £100 and £300 a year, and
the payback period stretches to 8 years or more <a href="https://www.energysavingtrust.org.uk/heat-pumps">[source]</a>.</p>
<ul><li>Old oil boiler: largest savings</li><li>LPG or electric storage heaters: large savings</li>
<li>Modern gas boiler: small savings</li></ul>
<h2>What does installation involve?</h2>
<p>An installer surveys the house, calculates the heat loss room by room and sizes the unit accordingly. Most
installations take 2 days and need a hot water cylinder and sometimes larger radiators. The government grant
of £7,500 is paid to the installer directly, as reported by the BBC in 2024 [1]. Ofgem said that more than
forty thousand grants were issued in the first year of the scheme.</p>
<table><tr><th>Home type</th><th>Typical unit</th><th>Installed cost</th></tr>
<tr><td>Flat</td><td>5 kW</td><td>£8,000</td></tr><tr><td>Semi-detached</td><td>8 kW</td><td>£11,000</td></tr></table>
<img src="/img/unit.jpg" alt="An outdoor heat pump unit"><img src="/img/chart.png">
<p>Read more in the <a href="https://blog.acme.example/heat-pump-myths">myths article</a> and the
<a href="https://www.gov.uk/apply-boiler-upgrade-scheme#eligibility">official eligibility rules</a>.</p>
</article>
</main>
<aside><h3>Newsletter</h3><p>Sign up for our newsletter and get a discount on your first order.</p></aside>
<footer><p>Copyright 2025 Acme Energy. All rights reserved. Registered in England.</p>
<a href="https://twitter.com/acme">Twitter</a></footer>
</body></html>
"""

FAQ_JSON_LD = """<html><head><title>Heat pump FAQ</title>
<script type="application/ld+json">
[{"@context": "https://schema.org", "@type": "FAQPage", "mainEntity": [
  {"@type": "Question", "name": "Do heat pumps work in winter?",
   "acceptedAnswer": {"@type": "Answer", "text": "Yes, down to about minus 20 degrees."}},
  {"@type": "Question", "name": "Are they noisy?",
   "acceptedAnswer": {"@type": "Answer", "text": "About as loud as a fridge."}},
  {"@type": "Question", "name": "Do I need new radiators?",
   "acceptedAnswer": {"@type": "Answer", "text": "Sometimes, in the coldest rooms."}}]}]
</script>
<script type="application/ld+json">{"@type": "Organization", "name": "Broken", </script>
<script type="application/ld+json">
<!-- {"@type": "WebSite", "name": "Acme", "url": "https://acme.example/"} -->
</script>
</head><body><h1>Heat pump FAQ</h1><p>Answers to common questions.</p></body></html>
"""

MICRODATA = """<html><head><title>Acme Energy - Contact</title></head><body>
<div itemscope itemtype="https://schema.org/LocalBusiness"><span itemprop="name">Acme Energy</span></div>
<section itemscope itemtype="http://schema.org/FAQPage">
  <div itemprop="mainEntity" itemscope itemtype="https://schema.org/Question">
    <h3 itemprop="name">When are you open?</h3>
    <div itemprop="acceptedAnswer" itemscope itemtype="https://schema.org/Answer">
      <p itemprop="text">Monday to Friday, 8am to 6pm, and Saturday mornings.</p></div></div>
  <div itemprop="mainEntity" itemscope itemtype="https://schema.org/Question">
    <h3 itemprop="name">Do you cover Wales?</h3>
    <div itemprop="acceptedAnswer" itemscope itemtype="https://schema.org/Answer">
      <p itemprop="text">Yes, we install across England and Wales.</p></div></div>
</section></body></html>
"""


@pytest.fixture(scope="module")
def article() -> ExtractedPage:
    return extract_page(ARTICLE, URL)


def test_main_text_keeps_the_article_and_drops_boilerplate(article: ExtractedPage) -> None:
    assert "moves heat from the outside air" in article.main_text
    assert "forty thousand grants" in article.main_text
    assert "Old oil boiler" in article.main_text
    assert "Shop our boilers" not in article.main_text
    assert "newsletter" not in article.main_text.lower()
    assert "All rights reserved" not in article.main_text
    assert article.word_count == len(article.main_text.split())


def test_head_metadata(article: ExtractedPage) -> None:
    assert article.title == "How heat pumps cut home heating bills | Acme Energy"
    assert article.lang == "en-GB"
    assert article.canonical_url == "https://www.acme.example/guides/heat-pumps"
    assert not article.noindex and not article.nofollow


def test_headings_in_document_order(article: ExtractedPage) -> None:
    assert article.headings == [
        (1, "How heat pumps cut home heating bills"),
        (2, "How much can you save?"),
        (2, "What does installation involve?"),
        (3, "Newsletter"),
    ]


def test_links_are_absolute_without_fragment_and_classified(article: ExtractedPage) -> None:
    by_text = {link.text: link for link in article.links}
    assert by_text["Home"].url == "https://www.acme.example/" and by_text["Home"].internal
    assert "Skip to content" not in by_text  # same-page fragment
    assert by_text["myths article"].internal  # subdomain of the same site
    rules = by_text["official eligibility rules"]
    assert rules.url == "https://www.gov.uk/apply-boiler-upgrade-scheme" and not rules.internal
    assert by_text["Jane Doe"].rel == "author"
    assert article.outbound_domains == ["energysavingtrust.org.uk", "gov.uk", "twitter.com"]


def test_site_key_handles_country_second_level_domains() -> None:
    assert site_key("shop.acme.co.uk") == site_key("www.acme.co.uk") == "acme.co.uk"
    assert site_key("other.co.uk") != site_key("acme.co.uk")
    assert site_key("blog.acme.example") == "acme.example"


def test_content_counts(article: ExtractedPage) -> None:
    assert article.lists == 1  # the nav is not a list and nothing outside <main> counts
    assert article.tables == 1
    assert (article.images, article.images_without_alt) == (2, 1)
    assert 0 < article.text_html_ratio < 1


def test_json_ld_graph_is_flattened(article: ExtractedPage) -> None:
    assert [obj.get("@type") for obj in article.json_ld] == ["Organization", ["Article", "BlogPosting"]]
    assert article.json_ld_errors == 0
    assert {"Organization", "Article", "BlogPosting", "Person"} <= set(article.schema_types)
    assert article.schema_types == sorted(article.schema_types)


def test_organization_entity(article: ExtractedPage) -> None:
    assert article.organization == {
        "name": "Acme Energy Ltd",
        "description": "Acme Energy installs heat pumps and solar panels for homes.",
        "sameAs": ["https://www.linkedin.com/company/acme-energy", "https://en.wikipedia.org/wiki/Acme_Energy"],
        "logo": "https://acme.example/logo.png",
        "url": "https://acme.example/",
        "foundingDate": "2009",
        "address": "1 High St, Leeds, GB",
    }


def test_authors_are_deduplicated(article: ExtractedPage) -> None:
    assert article.person_authors == ["Jane Doe"]


def test_dates(article: ExtractedPage) -> None:
    assert article.date_published == datetime(2024, 1, 10, 8, 0, tzinfo=UTC)
    assert article.date_modified == datetime(2025, 2, 27, 8, 30, tzinfo=UTC)
    assert article.last_updated_text == datetime(2025, 2, 27, tzinfo=UTC)


def test_evidence_counts(article: ExtractedPage) -> None:
    # £1,200 35% £100 £300 "8 years" "2 days" £7,500 "5 kW" £8,000 "8 kW" £11,000
    assert article.statistics == 11
    # two outbound links in <main> (the footer's Twitter link is not content) and "[1]"
    assert article.citations == 3
    # according to / a study by / reported by / said
    assert article.attributed_claims == 4


def test_passages_are_prefixed_with_their_heading_and_sized(article: ExtractedPage) -> None:
    assert len(article.passages) == 3
    save = next(p for p in article.passages if "payback period" in p)
    assert save.startswith("How much can you save?\n")
    assert "Old oil boiler" in save  # the list stays with its intro
    assert article.passages[0].startswith("How heat pumps cut home heating bills\n")
    assert all(40 <= len(p.split()) <= 200 for p in article.passages)


def test_split_passages_splits_walls_of_text_and_starts_at_headings() -> None:
    wall = " ".join(f"Sentence number {i} says something useful about pumps." for i in range(60))
    text = f"Intro\n{wall}\nSecond heading\nShort closing remark here."
    passages = split_passages(text, ["Intro", "Second heading"])
    assert len(passages) >= 3
    assert all(len(p.split()) <= 201 for p in passages)
    assert all(p.startswith("Intro\n") for p in passages[:-1])
    assert passages[-1] == "Second heading\nShort closing remark here."


def test_faq_from_json_ld_and_broken_blocks_are_counted() -> None:
    page = extract_page(FAQ_JSON_LD, "https://acme.example/faq")
    assert page.faq_pairs == 3
    assert page.json_ld_errors == 1
    assert "FAQPage" in page.schema_types and "Question" in page.schema_types
    assert "WebSite" in page.schema_types  # a block wrapped in an HTML comment still parses
    assert page.organization is None  # the broken block's Organization is not invented


def test_microdata_types_and_faq() -> None:
    page = extract_page(MICRODATA, "https://acme.example/contact")
    assert {"LocalBusiness", "FAQPage", "Question", "Answer"} <= set(page.schema_types)
    assert page.faq_pairs == 2
    assert page.json_ld == []


def test_question_headings_count_as_faq_only_with_an_answer() -> None:
    html = """<html><body><h1>Support</h1>
    <h2>Can I pause my plan?</h2><p>Yes, from the account page, for up to three months.</p>
    <div><h3>Is there a trial?</h3></div><p>There is a 14 day free trial on every plan.</p>
    <h2>Why choose us?</h2><h2>Contact</h2><p>Write to support.</p></body></html>"""
    assert extract_page(html, "https://acme.example/support").faq_pairs == 2


def test_title_falls_back_to_og_title_then_h1() -> None:
    og = '<html><head><meta property="og:title" content="OG title"></head><body><h1>H</h1></body></html>'
    assert extract_page(og, "https://a.example/").title == "OG title"
    assert extract_page("<html><body><h1> Only  the H1 </h1></body></html>", "https://a.example/").title == "Only the H1"
    assert extract_page("<html><body><p>No heading</p></body></html>", "https://a.example/").title == ""


def test_robots_meta() -> None:
    html = '<html><head><meta name="googlebot" content="noindex"><meta name="robots" content="nofollow"></head></html>'
    page = extract_page(html, "https://a.example/")
    assert page.noindex and page.nofollow
    none = extract_page('<html><head><meta name="robots" content="none"></head></html>', "https://a.example/")
    assert none.noindex and none.nofollow
    other = extract_page('<html><head><meta name="description" content="noindex"></head></html>', "https://a.example/")
    assert not other.noindex


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Last updated: March 3, 2025", datetime(2025, 3, 3, tzinfo=UTC)),
        ("Updated 2025-03-03 by the team", datetime(2025, 3, 3, tzinfo=UTC)),
        ("Modified on 3 March 2025.", datetime(2025, 3, 3, tzinfo=UTC)),
        ("Last reviewed Sept. 21st, 2024", datetime(2024, 9, 21, tzinfo=UTC)),
        ("updated 03/04/2025", datetime(2025, 3, 4, tzinfo=UTC)),
        ("Published March 3, 2025", None),
    ],
)
def test_last_updated_text(text: str, expected: datetime | None) -> None:
    page = extract_page(f"<html><body><p>{text}</p></body></html>", "https://a.example/")
    assert page.last_updated_text == expected


def test_dates_from_meta_and_time_elements() -> None:
    html = """<html><head><meta property="article:modified_time" content="2025-01-02T10:00:00+02:00"></head>
    <body><time datetime="2024-12-01">1 December</time></body></html>"""
    page = extract_page(html, "https://a.example/")
    assert page.date_modified == datetime(2025, 1, 2, 8, 0, tzinfo=UTC)
    assert page.date_published == datetime(2024, 12, 1, tzinfo=UTC)


def test_bytes_use_the_declared_charset() -> None:
    html = '<html><head><meta charset="windows-1252"><title>Caf\xe9 cr\xe8me</title></head><body></body></html>'
    page = extract_page(html.encode("cp1252"), "https://a.example/")
    assert page.title == "Café crème"
    legacy = b'<meta http-equiv="Content-Type" content="text/html; charset=ISO-8859-1"><title>Gr\xfc\xdfe</title>'
    assert extract_page(legacy, "https://a.example/").title == "Grüße"


def test_broken_bytes_are_replaced_not_fatal() -> None:
    page = extract_page(b"<html><head><title>Bad \xff\xfe bytes</title></head></html>", "https://a.example/")
    assert page.title == "Bad \ufffd\ufffd bytes"
    assert decode_html(b'<meta charset="no-such-charset">ok') == '<meta charset="no-such-charset">ok'


@pytest.mark.parametrize(
    "html",
    [b"", "", "   ", b"\x00\x00", "<", "<html><body><p>unclosed <b>tags <i>everywhere",
     '<?xml version="1.0" encoding="utf-8"?><html><body><p>xhtml</p></body></html>', "plain text, no tags"],
)
def test_malformed_input_never_raises(html: str | bytes) -> None:
    page = extract_page(html, "not a url")
    assert isinstance(page, ExtractedPage)
    assert page.word_count == len(page.main_text.split())


def test_large_input() -> None:
    sentence = "Heat pump number {i} moves heat rather than making it, which saves energy. "
    paragraphs = [f"<p>{sentence.format(i=i) * 12}</p>\n" for i in range(5_600)]
    html = "<html><body><article><h1>Big</h1>" + "".join(paragraphs) + "</article></body></html>"
    assert len(html) > 5_000_000
    page = extract_page(html.encode(), "https://a.example/big")
    assert page.title == "Big"
    assert page.word_count > 100_000


def test_fallback_when_trafilatura_finds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extract_mod.trafilatura, "extract", lambda *a, **k: None)
    html = """<html><body><nav>Menu item</nav><main><h1>Title</h1><p>First paragraph.</p>
    <script>var x = 1;</script><p>Second <b>paragraph</b>.</p></main><footer>Foot</footer></body></html>"""
    page = extract_page(html, "https://a.example/")
    assert page.main_text == "Title\nFirst paragraph.\nSecond paragraph."


def test_trafilatura_errors_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(extract_mod.trafilatura, "extract", boom)
    page = extract_page("<html><body><p>Only <em>body</em> text.</p></body></html>", "https://a.example/")
    assert page.main_text == "Only body text."


def test_thread_safe_and_deterministic() -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        pages = list(pool.map(lambda _: extract_page(ARTICLE.encode(), URL), range(16)))
    assert all(p == pages[0] for p in pages)
