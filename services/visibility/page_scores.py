"""How ready a page is to be used and cited by answer engines: four pillars, each 0-100.

`score_page(page, context)` turns an `ExtractedPage` (see `extract`) plus facts only the caller knows
(tracked-prompt similarities, brand facts, sitemap and HTTP dates, robots.txt) into a `PageScore`.
It is pure and deterministic: the clock is `context.now` (the current time only when that is None).

Each pillar's score is the weighted mean of its signals' scores (the weights of a pillar sum to 1).
`overall` is the mean of the applicable pillars; any blocker caps it at 20. Every signal scoring below 60
yields a `Finding` with a concrete fix; its `impact` is the points that signal costs its pillar,
weight x (100 - score). Findings are ordered by impact, largest first. Severity is "warning" below a
score of 40, "info" from 40 to 60 and "critical" for blockers.

Relevance (not applicable, score None and left out of `overall`, without tracked prompts).
`context.prompt_similarity` holds, per tracked prompt, the best cosine similarity of any passage.

* `prompt_coverage` (0.6): share of prompts with similarity >= 0.5; score = 100 x share.
  Finding LOW_PROMPT_COVERAGE.
* `prompt_similarity` (0.4): mean similarity s; score = 100 x clamp((s - 0.2) / 0.4), so 0.2 scores 0
  and 0.6 scores 100. Finding LOW_PROMPT_SIMILARITY.

Authority.

* `entity_consistency` (0.35): the page's Organization entity, else the site's most common one
  (`context.site_organization`), checked field by field against `context.brand`: name equals the brand
  name or an alias, ignoring case, punctuation and legal suffixes (0.35); description shares at least 30%
  of its distinct words with the brand description, half credit when present but different (0.2); share
  of the brand's sameAs profiles listed (0.3); logo equals the brand logo (same URL or file name), half
  credit when different (0.15). Without brand facts each field only has to be present. A page entity whose
  name differs from the site's entity loses 30% of the score. No entity at all scores 0.
  Findings MISSING_ORGANIZATION_SCHEMA / ENTITY_INCONSISTENT.
* `author_present` (0.2): 100 when a person author is named (JSON-LD, meta author, rel=author), else 0.
  Finding NO_AUTHOR.
* `third_party_mentions` (0.25): n crawled pages on other domains naming the brand (the crawl counts the
  project's `mention_sources`, see `third_party`); score = 100 x min(1, ln(1 + n) / ln(21)), so 20
  mentions score 100. Finding FEW_THIRD_PARTY_MENTIONS. Left out (the other weights rescaled) when
  `context.third_party_mentions` is None: nothing was counted (the project lists no sources), which is
  not the same as none found.
* `topical_depth` (0.2): 100 x (0.6 x min(1, words / 1000) + 0.4 x min(1, h2/h3 sections / 4)).
  Finding THIN_CONTENT.

Clarity and structure.

* `h1_count` (0.15): exactly one H1 scores 100, several 50, none 0. Findings NO_H1 / MULTIPLE_H1.
* `heading_hierarchy` (0.15): skips are H1-H4 headings more than one level deeper than the previous one
  (the first is compared with an implied H1); score = max(0, 100 - 45 x skips). A page of 300+ words
  without any H2-H4 scores 40. Findings HEADING_LEVELS_SKIPPED / NO_SUBHEADINGS.
* `passage_self_containment` (0.25): share of passages of 40-200 words; score = 100 x share (0 without
  passages). Finding FEW_ANSWER_PASSAGES.
* `lists_tables` (0.1): lists + tables: 0 scores 0, 1 scores 70, 2+ score 100. Finding NO_LISTS_OR_TABLES.
* `faq` (0.1): FAQPage markup with questions 100, question/answer pairs without markup 70, none 20.
  Finding NO_FAQ.
* `title` (0.15): a title of 10-70 characters 100, other lengths 50, none 0.
  Findings MISSING_TITLE / TITLE_LENGTH.
* `structured_data` (0.1): valid JSON-LD or microdata and no broken JSON-LD block 100; none at all 30;
  broken blocks 50 x valid / (valid + broken). Findings MISSING_JSON_LD / INVALID_JSON_LD.

Quality and freshness. Densities are per 1000 words of main text, with at least 300 words in the
denominator so that one number on a tiny page does not look like dense evidence.

* `statistics_density` (0.2): score = 100 x min(1, density / 4). Finding FEW_STATISTICS.
* `citation_density` (0.2): outbound links in the content and bracketed references;
  score = 100 x min(1, density / 3). Finding FEW_CITATIONS.
* `attribution_density` (0.1): attributed claims ("according to", "a study by", "said", ...);
  score = 100 x min(1, density / 2). Finding FEW_ATTRIBUTED_CLAIMS.
* `dates_present` (0.15): a machine-readable datePublished/dateModified 100, only a visible
  "last updated" text 60, neither 0. Finding NO_DATES.
* `freshness` (0.25): age in days of the content date, which is the later of dateModified and the visible
  "last updated" date, else datePublished, else sitemap lastmod, else HTTP Last-Modified.
  Up to 180 days 100, then down to 60 at 365 days, then from 50 down to 0 at 730 days; no date 30.
  Findings STALE_CONTENT (older than 365 days) / FRESHNESS_UNKNOWN.
* `freshness_agreement` (0.1): spread in days between the visible "last updated" date, dateModified,
  sitemap lastmod and HTTP Last-Modified (those present); more than 2 days scores 30, else 100.
  Finding FRESHNESS_SIGNALS_DISAGREE.

Blockers (pillar "blockers", severity critical, impact 80: the points the cap can take away).
NOINDEX (meta robots on the page or `context.noindex`, e.g. from X-Robots-Tag), AI_BOTS_BLOCKED
(`context.ai_bots_blocked`: robots.txt disallows the page to answer-engine crawlers, those that fetch
pages to answer or cite them, `robots.ANSWER_CRAWLERS`; blocking training crawlers is not a blocker),
HTTP_ERROR (status outside 200-399).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

from llmo.core.logging import get_logger
from llmo.visibility.extract import ExtractedPage

log = get_logger(__name__)

PILLARS = ("relevance", "authority", "clarity", "quality")
BLOCKER_CAP = 20.0
FINDING_THRESHOLD = 60.0
STALE_DAYS = 365
DISAGREE_DAYS = 2.0

_LEGAL_SUFFIXES = {"inc", "llc", "ltd", "gmbh", "corp", "corporation", "co", "plc", "sa", "ag", "bv", "srl"}
_WORD_RE = re.compile(r"[^\W_]+")


@dataclass
class BrandFacts:
    """The project's canonical brand facts the page's Organization entity is compared with."""

    name: str
    aliases: list[str] = field(default_factory=list)
    description: str = ""
    same_as: list[str] = field(default_factory=list)
    logo: str = ""
    domains: list[str] = field(default_factory=list)


@dataclass
class Signal:
    """One measured sub-signal: the raw value, its 0-100 score and its weight in the pillar."""

    name: str
    value: float
    score: float
    weight: float
    detail: str


@dataclass
class Finding:
    """A reason the page lost points, with the fix; `impact` is the points lost on the pillar."""

    pillar: str
    severity: str
    code: str
    message: str
    recommendation: str
    impact: float


@dataclass
class PillarScore:
    """A pillar's score (None when not applicable) and the signals it is the weighted mean of."""

    pillar: str
    score: float | None
    signals: list[Signal]


@dataclass
class PageScore:
    """The page's overall score, its pillars and its findings (largest impact first)."""

    overall: float
    pillars: dict[str, PillarScore]
    findings: list[Finding]


@dataclass
class ScoringContext:
    """Facts about the page that only the caller knows."""

    brand: BrandFacts | None = None
    prompt_similarity: list[float] | None = None
    site_organization: dict[str, object] | None = None
    third_party_mentions: int | None = None  # None: not counted, the signal is left out
    sitemap_lastmod: datetime | None = None
    http_last_modified: datetime | None = None
    noindex: bool = False
    ai_bots_blocked: list[str] = field(default_factory=list)
    http_status: int = 200
    now: datetime | None = None


@dataclass
class _Measured:
    """A signal and what to say about it should it score below the threshold."""

    signal: Signal
    code: str
    message: str
    recommendation: str


def _clamp(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return max(lo, min(hi, x))


def _m(name: str, value: float, score: float, weight: float, detail: str, code: str, message: str,
       recommendation: str) -> _Measured:
    return _Measured(Signal(name, round(float(value), 4), round(float(_clamp(score, 0, 100)), 1), weight, detail),
                     code, message, recommendation)


# ---------------------------------------------------------------- relevance


def _relevance(similarities: list[float]) -> list[_Measured]:
    n = len(similarities)
    covered = sum(1 for s in similarities if s >= 0.5)
    mean = sum(similarities) / n
    return [
        _m("prompt_coverage", covered / n, 100 * covered / n, 0.6,
           f"{covered} of {n} tracked prompts have a passage with similarity >= 0.5",
           "LOW_PROMPT_COVERAGE",
           f"Only {covered} of {n} tracked prompts are answered by a passage on this page.",
           "Add sections that answer the uncovered tracked prompts directly: a heading phrased like the "
           "question followed by a 40-200 word answer."),
        _m("prompt_similarity", mean, 100 * _clamp((mean - 0.2) / 0.4), 0.4,
           f"mean best-passage similarity {mean:.2f} over {n} prompts",
           "LOW_PROMPT_SIMILARITY",
           f"The page's passages are only loosely related to the tracked prompts (mean similarity {mean:.2f}).",
           "Use the vocabulary of the tracked prompts in headings and opening sentences, and state the "
           "answer in the first sentence of each section."),
    ]


# ---------------------------------------------------------------- authority


def _name_key(name: str) -> str:
    words = [w for w in _WORD_RE.findall(name.lower()) if w not in _LEGAL_SUFFIXES]
    return " ".join(words)


def _url_key(url: str) -> str:
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return url.strip().lower()
    host = (parts.hostname or "").lower().removeprefix("www.")
    return f"{host}{parts.path.rstrip('/')}".lower()


def _jaccard(a: str, b: str) -> float:
    wa, wb = set(_WORD_RE.findall(a.lower())), set(_WORD_RE.findall(b.lower()))
    return len(wa & wb) / len(wa | wb) if wa and wb else 0.0


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def _entity_consistency(page: ExtractedPage, context: ScoringContext) -> _Measured:
    org = page.organization or context.site_organization
    brand = context.brand
    if not org:
        return _m("entity_consistency", 0, 0, 0.35, "no Organization entity on the page or the site",
                  "MISSING_ORGANIZATION_SCHEMA",
                  "Neither this page nor the rest of the site declares an Organization entity.",
                  "Add an Organization JSON-LD block with name, description, logo and sameAs links to your "
                  "official profiles (e.g. LinkedIn, Wikipedia, Crunchbase).")
    name, description, logo = _text(org.get("name")), _text(org.get("description")), _text(org.get("logo"))
    raw_same_as = org.get("sameAs")
    same_as = [s for s in raw_same_as if isinstance(s, str)] if isinstance(raw_same_as, list) else []
    problems: list[str] = []
    fixes: list[str] = []
    parts: dict[str, float] = {}

    names = [brand.name, *brand.aliases] if brand else []
    if brand:
        parts["name"] = 1.0 if name and _name_key(name) in {_name_key(n) for n in names} else 0.0
    else:
        parts["name"] = 1.0 if name else 0.0
    if parts["name"] < 1:
        problems.append(f'name is "{name}"' if name else "name is missing")
        fixes.append(f'set "name" to "{brand.name}"' if brand else 'add "name"')

    if brand and brand.description:
        similarity = _jaccard(description, brand.description)
        parts["description"] = 1.0 if similarity >= 0.3 else 0.5 if description else 0.0
    else:
        parts["description"] = 1.0 if description else 0.0
    if parts["description"] < 1:
        problems.append("description differs from the brand description" if description else "description is missing")
        fixes.append("use the canonical brand description in \"description\"" if brand and brand.description
                     else 'add a one-sentence "description"')

    if brand and brand.same_as:
        listed = {_url_key(s) for s in same_as}
        missing = [s for s in brand.same_as if _url_key(s) not in listed]
        parts["sameAs"] = 1 - len(missing) / len(brand.same_as)
        if missing:
            problems.append(f"{len(missing)} of {len(brand.same_as)} official profiles missing from sameAs")
            fixes.append("add sameAs links to " + ", ".join(missing))
    else:
        parts["sameAs"] = 1.0 if same_as else 0.0
        if not same_as:
            problems.append("sameAs is empty")
            fixes.append("add sameAs links to your official profiles")

    if logo and brand and brand.logo:
        same_logo = _url_key(logo) == _url_key(brand.logo) or (
            _url_key(logo).rsplit("/", 1)[-1] == _url_key(brand.logo).rsplit("/", 1)[-1]
        )
        parts["logo"] = 1.0 if same_logo else 0.5
    else:
        parts["logo"] = 1.0 if logo else 0.0
    if parts["logo"] < 1:
        problems.append("logo differs from the brand logo" if logo else "logo is missing")
        fixes.append(f'set "logo" to {brand.logo}' if brand and brand.logo else 'add "logo" with your logo URL')

    weights = {"name": 0.35, "description": 0.2, "sameAs": 0.3, "logo": 0.15}
    share = sum(weights[k] * v for k, v in parts.items())
    site_org = context.site_organization
    if page.organization and site_org and _name_key(_text(page.organization.get("name"))) != _name_key(
        _text(site_org.get("name"))
    ):
        share *= 0.7
        problems.append(f'the page names the organization "{_text(page.organization.get("name"))}" but the '
                        f'rest of the site uses "{_text(site_org.get("name"))}"')
        fixes.append("use the same Organization entity on every page")
    detail = "; ".join(problems) if problems else "Organization entity matches the brand facts"
    return _m("entity_consistency", share, 100 * share, 0.35, detail, "ENTITY_INCONSISTENT",
              "The Organization markup does not match the brand: " + detail + ".",
              "Make the Organization JSON-LD match your brand facts: " + "; ".join(fixes) + ".")


def _authority(page: ExtractedPage, context: ScoringContext) -> list[_Measured]:
    sections = sum(1 for level, _ in page.headings if level in (2, 3))
    depth = 0.6 * _clamp(page.word_count / 1000) + 0.4 * _clamp(sections / 4)
    authors = ", ".join(page.person_authors)
    measured = [
        _entity_consistency(page, context),
        _m("author_present", len(page.person_authors), 100 if page.person_authors else 0, 0.2,
           f"authors: {authors}" if authors else "no author named", "NO_AUTHOR",
           "The page names no author.",
           "Name the author in a visible byline linked with rel=\"author\" to an author page, and add "
           "\"author\": {\"@type\": \"Person\", \"name\": ...} to the Article JSON-LD."),
        _m("topical_depth", page.word_count, 100 * depth, 0.2,
           f"{page.word_count} words, {sections} H2/H3 sections", "THIN_CONTENT",
           f"The page is thin: {page.word_count} words in {sections} H2/H3 sections.",
           "Cover the topic in depth: aim for 1000+ words organised in at least 4 H2/H3 sections, each "
           "answering one sub-question."),
    ]
    if context.third_party_mentions is None:  # not counted (unknown is not zero): rescale the others to 1
        for m in measured:
            m.signal.weight = m.signal.weight / 0.75
    else:
        n = max(0, context.third_party_mentions)
        measured.insert(2, _m(
            "third_party_mentions", n, 100 * _clamp(math.log1p(n) / math.log(21)), 0.25,
            f"{n} pages on other domains name the brand", "FEW_THIRD_PARTY_MENTIONS",
            f"Only {n} crawled pages on other domains mention the brand.",
            "Earn mentions on independent sites answer engines trust (reviews, industry press, directories, "
            "Wikipedia, community forums) and list those profiles in sameAs."))
    return measured


# ---------------------------------------------------------------- clarity


def _clarity(page: ExtractedPage) -> list[_Measured]:
    h1 = sum(1 for level, _ in page.headings if level == 1)
    out = [
        _m("h1_count", h1, 100 if h1 == 1 else 50 if h1 > 1 else 0, 0.15, f"{h1} H1 heading(s)",
           "MULTIPLE_H1" if h1 > 1 else "NO_H1",
           f"The page has {h1} H1 headings." if h1 > 1 else "The page has no H1 heading.",
           "Keep exactly one H1 that states the page's topic; turn the other H1s into H2s." if h1 > 1
           else "Add one H1 that states the page's topic in plain words."),
    ]

    skips: list[str] = []
    previous = 1
    for level, text in page.headings:
        if level > 4:
            continue
        if level > previous + 1:
            skips.append(f'H{previous} -> H{level} ("{text[:40]}")')
        previous = level
    subheadings = sum(1 for level, _ in page.headings if 2 <= level <= 4)
    if not subheadings and page.word_count >= 300:
        out.append(_m("heading_hierarchy", 0, 40, 0.15, f"no H2-H4 headings in {page.word_count} words",
                      "NO_SUBHEADINGS", "The page is one block of text without H2-H4 subheadings.",
                      "Break the content into sections with H2 headings (H3 for sub-points), each phrased "
                      "like the question it answers."))
    else:
        out.append(_m("heading_hierarchy", len(skips), 100 - 45 * len(skips), 0.15,
                      "skipped levels: " + ", ".join(skips) if skips else "no skipped heading levels",
                      "HEADING_LEVELS_SKIPPED",
                      f"Heading levels are skipped {len(skips)} time(s): " + ", ".join(skips) + ".",
                      "Nest headings one level at a time (H1, then H2, then H3) so the outline can be "
                      "followed; change the skipped headings' levels."))

    sizes = [len(p.split()) for p in page.passages]
    good = sum(1 for n in sizes if 40 <= n <= 200)
    share = good / len(sizes) if sizes else 0.0
    out.append(_m("passage_self_containment", share, 100 * share, 0.25,
                  f"{good} of {len(sizes)} passages have 40-200 words", "FEW_ANSWER_PASSAGES",
                  f"Only {good} of {len(sizes)} passages are self-contained answers of 40-200 words.",
                  "Under each heading, write a 40-200 word paragraph that answers it completely without "
                  "relying on the surrounding text; merge one-line fragments and split walls of text."))

    structures = page.lists + page.tables
    out.append(_m("lists_tables", structures, 0 if structures == 0 else 70 if structures == 1 else 100, 0.1,
                  f"{page.lists} lists, {page.tables} tables", "NO_LISTS_OR_TABLES",
                  "The main content has no lists or tables.",
                  "Present steps, options and comparisons as bulleted/numbered lists or an HTML table; "
                  "answer engines lift them verbatim."))

    has_faq_schema = "FAQPage" in page.schema_types
    faq_score = 100 if has_faq_schema and page.faq_pairs else 70 if page.faq_pairs else 20
    out.append(_m("faq", page.faq_pairs, faq_score, 0.1,
                  f"{page.faq_pairs} question/answer pairs" + (", FAQPage markup" if has_faq_schema else ""),
                  "NO_FAQ", "The page has no question-and-answer content.",
                  "Add an FAQ section with the questions your customers ask (question headings ending in \"?\" "
                  "followed by a short answer) and mark it up as FAQPage JSON-LD."))

    length = len(page.title)
    title_score = 100 if 10 <= length <= 70 else 50 if length else 0
    out.append(_m("title", length, title_score, 0.15, f"title of {length} characters",
                  "TITLE_LENGTH" if length else "MISSING_TITLE",
                  f"The title is {length} characters long." if length else "The page has no <title>.",
                  "Rewrite the <title> to 10-70 characters naming the topic and the brand." if length
                  else "Add a <title> of 10-70 characters naming the topic and the brand."))

    valid = len(page.json_ld) + (1 if page.schema_types and not page.json_ld else 0)
    broken = page.json_ld_errors
    if broken:
        sd_score = 50 * valid / (valid + broken)
        code, message = "INVALID_JSON_LD", f"{broken} JSON-LD block(s) are not valid JSON and are ignored by crawlers."
        fix = "Fix the syntax of the broken JSON-LD blocks (validate them with the Schema.org validator)."
    else:
        sd_score = 100 if valid else 30
        code, message = "MISSING_JSON_LD", "The page has no structured data (JSON-LD or microdata)."
        fix = "Add JSON-LD describing the page (Article, Product or FAQPage) and your Organization."
    out.append(_m("structured_data", valid, sd_score, 0.1, f"{valid} valid structured-data items, {broken} broken",
                  code, message, fix))
    return out


# ---------------------------------------------------------------- quality


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _freshness_score(age_days: float) -> float:
    if age_days <= 180:
        return 100.0
    if age_days <= STALE_DAYS:
        return 100 - 40 * (age_days - 180) / (STALE_DAYS - 180)
    return max(0.0, 50 - 50 * (age_days - STALE_DAYS) / STALE_DAYS)


def _quality(page: ExtractedPage, context: ScoringContext, now: datetime) -> list[_Measured]:
    per_k = 1000 / max(page.word_count, 300)
    stats, cites, claims = page.statistics * per_k, page.citations * per_k, page.attributed_claims * per_k
    out = [
        _m("statistics_density", stats, 100 * _clamp(stats / 4), 0.2,
           f"{page.statistics} statistics in {page.word_count} words", "FEW_STATISTICS",
           f"The page gives few concrete numbers ({stats:.1f} per 1000 words).",
           "Back claims with specific figures (percentages, amounts, counts) and say where they come from."),
        _m("citation_density", cites, 100 * _clamp(cites / 3), 0.2,
           f"{page.citations} citations in {page.word_count} words", "FEW_CITATIONS",
           f"The page cites few sources ({cites:.1f} per 1000 words).",
           "Link to the primary sources of your facts (studies, official statistics, documentation) from "
           "the sentences that use them."),
        _m("attribution_density", claims, 100 * _clamp(claims / 2), 0.1,
           f"{page.attributed_claims} attributed claims in {page.word_count} words", "FEW_ATTRIBUTED_CLAIMS",
           f"Few claims are attributed to a source ({claims:.1f} per 1000 words).",
           "Attribute key claims in the sentence itself (\"according to the 2024 Gartner survey, ...\", "
           "quotes from named experts)."),
    ]
    machine_date = page.date_published or page.date_modified
    out.append(_m("dates_present", 2 if machine_date else 1 if page.last_updated_text else 0,
                  100 if machine_date else 60 if page.last_updated_text else 0, 0.15,
                  "machine-readable date" if machine_date else
                  "only a visible 'last updated' date" if page.last_updated_text else "no dates",
                  "NO_DATES", "The page carries no publication or modification date.",
                  "Show a visible \"Last updated\" date and add datePublished and dateModified to the "
                  "page's JSON-LD (or article:published_time / article:modified_time meta tags)."))

    modified = [d for d in (_utc(page.date_modified), _utc(page.last_updated_text)) if d]
    content_date = (max(modified) if modified else None) or _utc(page.date_published) or _utc(
        context.sitemap_lastmod) or _utc(context.http_last_modified)
    if content_date is None:
        out.append(_m("freshness", -1, 30, 0.25, "no date to judge freshness by", "FRESHNESS_UNKNOWN",
                      "Nothing tells crawlers when this page was last updated.",
                      "Publish dateModified in JSON-LD, a visible \"Last updated\" line, and a <lastmod> for "
                      "the page in your sitemap, all kept in sync."))
    else:
        age = (now - content_date).total_seconds() / 86400
        out.append(_m("freshness", age, _freshness_score(age), 0.25,
                      f"content dated {content_date.date().isoformat()}, {age:.0f} days old", "STALE_CONTENT",
                      f"The content was last updated {age:.0f} days ago ({content_date.date().isoformat()}).",
                      "Review and update the page (facts, figures, examples), then bump dateModified, the "
                      "visible \"Last updated\" date and the sitemap lastmod together."))

    sources = {
        "visible 'last updated'": _utc(page.last_updated_text),
        "dateModified": _utc(page.date_modified),
        "sitemap lastmod": _utc(context.sitemap_lastmod),
        "HTTP Last-Modified": _utc(context.http_last_modified),
    }
    present = {k: v for k, v in sources.items() if v is not None}
    spread = (max(present.values()) - min(present.values())).total_seconds() / 86400 if len(present) > 1 else 0.0
    listing = ", ".join(f"{k} {v.date().isoformat()}" for k, v in present.items())
    out.append(_m("freshness_agreement", spread, 30 if spread > DISAGREE_DAYS else 100, 0.1,
                  f"spread {spread:.1f} days ({listing})" if present else "no freshness signals to compare",
                  "FRESHNESS_SIGNALS_DISAGREE",
                  f"The freshness signals disagree by {spread:.0f} days: {listing}.",
                  "Generate dateModified, the visible \"Last updated\" date, the sitemap lastmod and the "
                  "Last-Modified header from the same content timestamp."))
    return out


# ---------------------------------------------------------------- blockers and assembly


def _blockers(page: ExtractedPage, context: ScoringContext) -> list[Finding]:
    out: list[Finding] = []
    impact = 100 - BLOCKER_CAP

    def add(code: str, message: str, recommendation: str) -> None:
        out.append(Finding("blockers", "critical", code, message, recommendation, impact))

    if page.noindex or context.noindex:
        add("NOINDEX", "The page asks search and answer engines not to index it (noindex).",
            "Remove noindex from the meta robots tag and the X-Robots-Tag header if the page should be "
            "found and cited.")
    if context.ai_bots_blocked:
        bots = ", ".join(sorted(context.ai_bots_blocked))
        add("AI_BOTS_BLOCKED", f"robots.txt blocks these AI crawlers from the page: {bots}.",
            f"Allow {bots} in robots.txt (a User-agent group with Allow: / for each) unless you mean to "
            "stay out of their answers.")
    if not 200 <= context.http_status < 400:
        add("HTTP_ERROR", f"The page answers HTTP {context.http_status}.",
            "Serve the page with HTTP 200 (fix the error or redirect the URL to its replacement with a 301).")
    return out


def _pillar(name: str, measured: list[_Measured]) -> tuple[PillarScore, list[Finding]]:
    total = sum(m.signal.weight for m in measured)
    score = sum(m.signal.weight * m.signal.score for m in measured) / total
    findings = []
    for m in measured:
        if m.signal.score < FINDING_THRESHOLD:
            severity = "warning" if m.signal.score < 40 else "info"
            impact = round(m.signal.weight / total * (100 - m.signal.score), 2)
            findings.append(Finding(name, severity, m.code, m.message, m.recommendation, impact))
    return PillarScore(name, round(score, 1), [m.signal for m in measured]), findings


def score_page(page: ExtractedPage, context: ScoringContext) -> PageScore:
    """Score one page on the four pillars and list its findings (definitions in the module docstring)."""
    now = _utc(context.now) or datetime.now(UTC)
    builders: dict[str, Callable[[], list[_Measured]]] = {
        "authority": lambda: _authority(page, context),
        "clarity": lambda: _clarity(page),
        "quality": lambda: _quality(page, context, now),
    }
    pillars: dict[str, PillarScore] = {}
    findings: list[Finding] = []
    if context.prompt_similarity:
        pillar, found = _pillar("relevance", _relevance([float(s) for s in context.prompt_similarity]))
        pillars["relevance"], findings = pillar, found
    else:
        pillars["relevance"] = PillarScore("relevance", None, [])
    for name, build in builders.items():
        pillar, found = _pillar(name, build())
        pillars[name] = pillar
        findings.extend(found)

    applicable = [p.score for p in pillars.values() if p.score is not None]
    overall = sum(applicable) / len(applicable)
    blockers = _blockers(page, context)
    if blockers:
        overall = min(overall, BLOCKER_CAP)
        findings.extend(blockers)
    order = {p: i for i, p in enumerate(("blockers", *PILLARS))}
    findings.sort(key=lambda f: (-f.impact, order[f.pillar], f.code))
    log.debug("page_scores.scored", url=page.url, overall=round(overall, 1), findings=len(findings))
    return PageScore(round(overall, 1), {p: pillars[p] for p in PILLARS}, findings)
