"""What an answer engine's crawler sees on a page: main content, structure, entities and evidence.

AI crawlers do not run JavaScript, so everything here works on the raw HTML. `extract_page` is pure and
thread-safe and never raises: malformed HTML, broken encodings, empty input and multi-megabyte pages all
give an `ExtractedPage` (an empty one at worst).

Rules (each pinned by a test):

* Decoding: bytes are decoded with the charset of a byte-order mark, `<meta charset>` or
  `<meta http-equiv="Content-Type" content="...; charset=...">` in the first 4 KiB, else UTF-8; bytes
  that do not decode become U+FFFD.
* Main content: `trafilatura.extract` with `include_comments=False, include_tables=True,
  favor_precision=True` (measured best on the ScrapingHub article-extraction benchmark, see
  `extraction_eval`). When trafilatura finds nothing, the text of `<main>`, else `<article>`, else
  `<body>` without scripts, navigation, header, footer, asides and forms, one line per block element.
* The *content area* (for lists, tables and citations) is the first `<main>`, else the longest
  `<article>`, else `<body>`, ignoring anything inside nav/header/footer/aside.
* Passages: the main text is cut into blocks (one per paragraph; consecutive list items or table rows
  stay together). A heading line (a line equal to one of the page's h1-h6) starts a new passage. A block
  starts a new passage when it would take the current one over 200 words, or when both hold 40+ words;
  otherwise it joins the current one. A single block over 200 words is split at sentence ends. Every passage is
  prefixed with its nearest heading (the title before the first heading) so it stands alone when quoted.
* Links: `<a href>` with an http(s) target, resolved against `<base href>` or the page URL, fragment
  dropped. *Internal* means the same registrable domain, approximated by the last two host labels (three
  when the second-level label is a generic one like `co`/`com`/`org` under a two-letter country code,
  so `a.example.co.uk` and `b.example.co.uk` are internal but `other.co.uk` is not).
* JSON-LD: every `<script type="application/ld+json">`, top-level arrays and `@graph` flattened; a block
  that is not valid JSON (after removing HTML comment/CDATA wrappers) counts in `json_ld_errors`.
  `schema_types` holds the short names of every JSON-LD `@type` (nested entities too) and microdata
  `itemtype`. `organization` is the first Organization-like entity (`Organization`, any `*Organization`,
  `Corporation`, `LocalBusiness`, `OnlineBusiness`, `OnlineStore`), top-level entities first.
* Authors: JSON-LD `author` values that are not organizations, `<meta name="author">`, the text of
  `rel="author"` links; deduplicated in that order.
* Dates are timezone-aware (UTC when the source has no offset). `date_published`: JSON-LD
  `datePublished`, else `article:published_time` / `itemprop=datePublished` meta, else the first
  `<time datetime>`. `date_modified`: JSON-LD `dateModified`, else `article:modified_time` /
  `og:updated_time` / `itemprop=dateModified`. `last_updated_text`: the first "Last updated: March 3,
  2025", "Updated 2025-03-03", "Modified on 3 March 2025", "Reviewed Mar 3, 2025" or "updated 03/03/2025"
  (US order) in the visible text.
* Evidence counts on the main text: `statistics` are numbers with `%`/percent, a currency sign or code,
  or a unit/scale word (million, km, GB, hours, ...); `citations` are outbound links in the content area
  plus bracketed references like `[3]`; `attributed_claims` are "according to", "a study/survey/report
  by|from", "research by|from", "reported by", "said", "says", "stated".
* `faq_pairs`: the Question entities of a FAQPage (JSON-LD or microdata) when there are any, else
  question headings (h2-h6 ending in "?"), `<summary>` and `<dt>` questions followed by at least 20
  characters of answer text.
* `images_without_alt` counts `<img>` without a non-blank alt; `tables` skips layout tables
  (`role=presentation` or containing another table); `text_html_ratio` is visible text characters over
  HTML characters.
"""

from __future__ import annotations

import codecs
import copy
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import lxml.etree
import lxml.html
import trafilatura

from llmo.core.logging import get_logger

log = get_logger(__name__)

PASSAGE_MIN_WORDS = 40
PASSAGE_MAX_WORDS = 200

_HEADING_TAGS = ("h1", "h2", "h3", "h4", "h5", "h6")
_BOILERPLATE_TAGS = {"nav", "header", "footer", "aside"}
_NON_TEXT_TAGS = {"script", "style", "noscript", "template", "svg"}
_BLOCK_TAGS = {
    "p", "div", "li", "dd", "dt", "tr", "br", "blockquote", "pre", "section", "article", "main",
    "table", "ul", "ol", "dl", "figure", "figcaption", "summary", "details", *_HEADING_TAGS,
}
_ORG_TYPES = {"Organization", "Corporation", "LocalBusiness", "OnlineBusiness", "OnlineStore"}
_GENERIC_SLDS = {"co", "com", "org", "net", "ac", "gov", "edu", "ne", "or"}

_CHARSET_RE = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_:.\-]+)""", re.IGNORECASE)
_XML_DECL_RE = re.compile(r"^\s*<\?xml[^>]*\?>", re.IGNORECASE)
_WS_RE = re.compile(r"\s+")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+")
_BRACKET_REF_RE = re.compile(r"\[\d{1,3}\]")
_NUM = r"\d[\d,]*(?:\.\d+)?"
_STAT_RE = re.compile(
    rf"(?:[$€£¥₹]\s?{_NUM}(?:\s?(?:k|m|bn|million|billion|trillion)\b)?"
    rf"|\b(?:USD|EUR|GBP)\s?{_NUM}"
    rf"|\b{_NUM}\s?(?:%|percent\b|per\s+cent\b|USD\b|EUR\b|GBP\b"
    r"|(?:thousand|million|billion|trillion|km|kg|mg|lbs?|mph|kWh|kW|MW|GB|MB|TB|ms|x"
    r"|seconds|minutes|hours|days|weeks|months|years|users|customers|people|times)\b))",
    re.IGNORECASE,
)
_ATTRIBUTION_RE = re.compile(
    r"\b(?:according\s+to|an?\s+(?:study|survey|report|analysis)\s+(?:by|from)|research\s+(?:by|from)"
    r"|reported\s+by|said|says|stated)\b",
    re.IGNORECASE,
)
_MONTHS = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_UPDATED_RE = re.compile(
    r"\b(?:last\s+)?(?:updated|modified|reviewed)(?:\s+on)?\s*[:\-–—]?\s*"
    rf"({_MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}|\d{{1,2}}\s+{_MONTHS},?\s+\d{{4}}"
    r"|\d{4}-\d{2}-\d{2}|\d{1,2}/\d{1,2}/\d{4})",
    re.IGNORECASE,
)
_TEXT_DATE_FORMATS = ("%B %d %Y", "%b %d %Y", "%d %B %Y", "%d %b %Y", "%Y-%m-%d", "%m/%d/%Y")


@dataclass
class Link:
    """One hyperlink: absolute URL without fragment, anchor text, rel attribute, same-site or not."""

    url: str
    text: str
    rel: str
    internal: bool


@dataclass
class ExtractedPage:
    """Everything the page scores need, measured on the raw HTML (see the module docstring)."""

    url: str
    title: str = ""
    lang: str | None = None
    canonical_url: str | None = None
    noindex: bool = False
    nofollow: bool = False
    main_text: str = ""
    word_count: int = 0
    passages: list[str] = field(default_factory=list)
    headings: list[tuple[int, str]] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    outbound_domains: list[str] = field(default_factory=list)
    lists: int = 0
    tables: int = 0
    images_without_alt: int = 0
    images: int = 0
    json_ld: list[dict[str, Any]] = field(default_factory=list)
    json_ld_errors: int = 0
    schema_types: list[str] = field(default_factory=list)
    organization: dict[str, object] | None = None
    person_authors: list[str] = field(default_factory=list)
    date_published: datetime | None = None
    date_modified: datetime | None = None
    last_updated_text: datetime | None = None
    statistics: int = 0
    citations: int = 0
    attributed_claims: int = 0
    faq_pairs: int = 0
    text_html_ratio: float = 0.0


# ---------------------------------------------------------------- decoding and parsing


def decode_html(data: str | bytes) -> str:
    """Bytes to text: BOM, then `<meta charset>`, then UTF-8, undecodable bytes replaced."""
    if isinstance(data, str):
        return data
    for bom, enc in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):
            return data[len(bom):].decode(enc, errors="replace")
    encoding = "utf-8"
    match = _CHARSET_RE.search(data[:4096])
    if match:
        name = match.group(1).decode("ascii", errors="ignore")
        try:
            encoding = codecs.lookup(name).name
        except LookupError:
            pass
        # a page declaring UTF-16 in ASCII-compatible bytes is lying about its encoding
        if encoding.startswith("utf-16") or encoding.startswith("utf-32"):
            encoding = "utf-8"
    return data.decode(encoding, errors="replace")


def _parse(text: str) -> lxml.html.HtmlElement | None:
    text = _XML_DECL_RE.sub("", text.replace("\x00", ""))
    if not text.strip():
        return None
    parser = lxml.html.HTMLParser(encoding="utf-8", recover=True, huge_tree=True, remove_comments=True)
    try:
        root = lxml.html.document_fromstring(text.encode("utf-8", errors="replace"), parser=parser)
    except (lxml.etree.LxmlError, ValueError) as exc:
        log.debug("extract.parse_failed", error=str(exc))
        return None
    return root if isinstance(root, lxml.html.HtmlElement) else None


def _norm(text: str | None) -> str:
    return _WS_RE.sub(" ", text or "").strip()


def _elements(root: lxml.html.HtmlElement, tag: str) -> Iterator[lxml.html.HtmlElement]:
    for el in root.iter(tag):
        if isinstance(el, lxml.html.HtmlElement):
            yield el


def _in_boilerplate(el: lxml.html.HtmlElement, stop: lxml.html.HtmlElement) -> bool:
    parent = el.getparent()
    while parent is not None and parent is not stop:
        if parent.tag in _BOILERPLATE_TAGS:
            return True
        parent = parent.getparent()
    return False


def _visible_text(el: lxml.html.HtmlElement) -> str:
    """Text of `el` without scripts/styles, one line per block element."""
    clone = copy.deepcopy(el)
    for bad in list(clone.iter(*_NON_TEXT_TAGS)):
        bad.drop_tree()
    for block in clone.iter(*_BLOCK_TAGS):
        block.tail = "\n" + (block.tail or "")
    lines = (_norm(line) for line in clone.text_content().split("\n"))
    return "\n".join(line for line in lines if line)


def _fallback_text(root: lxml.html.HtmlElement) -> str:
    # explicit None checks: an lxml element without children is falsy
    area = next(_elements(root, "main"), None)
    for fallback in (next(_elements(root, "article"), None), root.find("body"), root):
        if area is None:
            area = fallback
    assert area is not None
    clone = copy.deepcopy(area)
    for bad in list(clone.iter(*_BOILERPLATE_TAGS, "form")):
        bad.drop_tree()
    return _visible_text(clone)


def _main_text(text: str, url: str, root: lxml.html.HtmlElement) -> str:
    try:
        out = trafilatura.extract(
            text, url=url or None, include_comments=False, include_tables=True, favor_precision=True
        )
    except Exception as exc:  # trafilatura bugs must not take a crawl down
        log.warning("extract.trafilatura_failed", url=url, error=repr(exc))
        out = None
    return out if out else _fallback_text(root)


def _content_area(root: lxml.html.HtmlElement) -> lxml.html.HtmlElement:
    main = next(_elements(root, "main"), None)
    if main is not None:
        return main
    articles = list(_elements(root, "article"))
    if articles:
        return max(articles, key=lambda a: len(a.text_content()))
    body = root.find("body")
    return body if body is not None else root


# ---------------------------------------------------------------- head metadata


def _meta(root: lxml.html.HtmlElement, *keys: str) -> str | None:
    """First non-empty content of a meta tag whose name, property or itemprop is one of `keys`."""
    wanted = {k.lower() for k in keys}
    for el in _elements(root, "meta"):
        key = (el.get("name") or el.get("property") or el.get("itemprop") or "").strip().lower()
        if key in wanted:
            content = _norm(el.get("content"))
            if content:
                return content
    return None


def _title(root: lxml.html.HtmlElement) -> str:
    title_el = next(_elements(root, "title"), None)
    if title_el is not None and _norm(title_el.text_content()):
        return _norm(title_el.text_content())
    og = _meta(root, "og:title")
    if og:
        return og
    h1 = next(_elements(root, "h1"), None)
    return _norm(h1.text_content()) if h1 is not None else ""


def _robots(root: lxml.html.HtmlElement) -> tuple[bool, bool]:
    noindex = nofollow = False
    for el in _elements(root, "meta"):
        if (el.get("name") or "").strip().lower() in ("robots", "googlebot"):
            directives = {d.strip() for d in (el.get("content") or "").lower().split(",")}
            noindex |= bool(directives & {"noindex", "none"})
            nofollow |= bool(directives & {"nofollow", "none"})
    return noindex, nofollow


def _base_url(root: lxml.html.HtmlElement, url: str) -> str:
    base = next((b.get("href") for b in _elements(root, "base") if b.get("href")), None)
    return urljoin(url, base.strip()) if base else url


def _canonical(root: lxml.html.HtmlElement, base: str) -> str | None:
    for el in _elements(root, "link"):
        if "canonical" in (el.get("rel") or "").lower().split() and (el.get("href") or "").strip():
            return urljoin(base, el.get("href", "").strip())
    return None


# ---------------------------------------------------------------- links


def site_key(host: str) -> str:
    """The registrable-ish domain of `host`: its last two labels, three under e.g. `co.uk`."""
    labels = host.lower().strip(".").split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _GENERIC_SLDS:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def _links(root: lxml.html.HtmlElement, base: str, page_host: str) -> list[tuple[lxml.html.HtmlElement, Link]]:
    """(anchor element, link) for every http(s) link under `root`."""
    page_site = site_key(page_host) if page_host else ""
    out: list[tuple[lxml.html.HtmlElement, Link]] = []
    resolved: dict[str, tuple[str, bool] | None] = {}  # a page repeats its hrefs (menus, footers)
    for a in _elements(root, "a"):
        href = (a.get("href") or "").strip()
        if not href or href.startswith("#"):
            continue
        if href not in resolved:
            resolved[href] = _resolve(base, href, page_host, page_site)
        target = resolved[href]
        if target is not None:
            out.append((a, Link(target[0], _norm(a.text_content()), _norm(a.get("rel")).lower(), target[1])))
    return out


def _resolve(base: str, href: str, page_host: str, page_site: str) -> tuple[str, bool] | None:
    """(absolute URL without fragment, internal) of an http(s) link, or None."""
    try:
        parts = urlsplit(urljoin(base, href))
        host = (parts.hostname or "").lower()
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not host:
        return None
    absolute = urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, ""))
    return absolute, host == page_host or (bool(page_site) and site_key(host) == page_site)


def _host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


# ---------------------------------------------------------------- structured data


def _json_ld(root: lxml.html.HtmlElement) -> tuple[list[dict[str, Any]], int]:
    objects: list[dict[str, Any]] = []
    errors = 0
    for script in _elements(root, "script"):
        if (script.get("type") or "").strip().lower() != "application/ld+json":
            continue
        raw = (script.text or "").strip()
        raw = re.sub(r"^\s*(?://\s*)?(?:<!--|<!\[CDATA\[)|(?://\s*)?(?:-->|\]\]>)\s*$", "", raw).strip()
        if not raw:
            continue
        try:
            data = json.loads(raw, strict=False)  # strict=False: raw newlines inside strings are common
        except ValueError:
            errors += 1
            continue
        objects.extend(_flatten(data))
    return objects, errors


def _flatten(data: Any) -> Iterator[dict[str, Any]]:
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    elif isinstance(data, dict):
        graph = data.get("@graph")
        if graph is not None:
            yield from _flatten(graph)
            if "@type" in data:
                yield {k: v for k, v in data.items() if k != "@graph"}
        else:
            yield data


def _walk(obj: Any) -> Iterator[dict[str, Any]]:
    """Every dict inside `obj`, depth first, `obj` itself first."""
    if isinstance(obj, dict):
        yield obj
        for value in obj.values():
            yield from _walk(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from _walk(item)


def short_type(value: str) -> str:
    """`https://schema.org/FAQPage` or `schema:FAQPage` -> `FAQPage`."""
    return re.split(r"[/#:]", value.strip().rstrip("/"))[-1]


def types_of(obj: dict[str, Any]) -> list[str]:
    """Short schema.org type names of one JSON-LD object."""
    raw = obj.get("@type")
    values = raw if isinstance(raw, list) else [raw]
    return [short_type(v) for v in values if isinstance(v, str) and v.strip()]


def _is_org(obj: dict[str, Any]) -> bool:
    return any(t in _ORG_TYPES or t.endswith("Organization") for t in types_of(obj))


def _microdata_types(root: lxml.html.HtmlElement) -> list[str]:
    out: list[str] = []
    for el in root.iter():
        itemtype = el.get("itemtype") if isinstance(el, lxml.html.HtmlElement) else None
        if itemtype:
            out.extend(short_type(t) for t in itemtype.split() if t.strip())
    return out


def _text_value(value: Any) -> str | None:
    if isinstance(value, str):
        return _norm(value) or None
    if isinstance(value, list):
        return next((v for v in (_text_value(i) for i in value) if v), None)
    if isinstance(value, dict):
        return _text_value(value.get("url") or value.get("contentUrl") or value.get("name") or value.get("@id"))
    return None


def _address(value: Any) -> str | None:
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, dict):
        keys = ("streetAddress", "addressLocality", "addressRegion", "postalCode", "addressCountry")
        parts = [_text_value(value.get(k)) for k in keys]
        joined = ", ".join(p for p in parts if p)
        return joined or None
    return _text_value(value)


def _organization(objects: list[dict[str, Any]]) -> dict[str, object] | None:
    nested = (o for top in objects for o in _walk(top) if o is not top)
    for obj in (*objects, *nested):
        if not _is_org(obj):
            continue
        same_as = obj.get("sameAs")
        same_as_list = same_as if isinstance(same_as, list) else [same_as]
        return {
            "name": _text_value(obj.get("name")),
            "description": _text_value(obj.get("description")),
            "sameAs": [_norm(s) for s in same_as_list if isinstance(s, str) and _norm(s)],
            "logo": _text_value(obj.get("logo")),
            "url": _text_value(obj.get("url")),
            "foundingDate": _text_value(obj.get("foundingDate")),
            "address": _address(obj.get("address")),
        }
    return None


def _authors(root: lxml.html.HtmlElement, objects: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for obj in (o for top in objects for o in _walk(top)):
        value = obj.get("author")
        for author in value if isinstance(value, list) else [value]:
            if isinstance(author, str):
                names.append(_norm(author))
            elif isinstance(author, dict) and not _is_org(author):
                names.append(_text_value(author.get("name")) or "")
    meta = _meta(root, "author")
    if meta:
        names.append(meta)
    for a in _elements(root, "a"):
        if "author" in (a.get("rel") or "").lower().split():
            names.append(_norm(a.text_content()))
    seen: dict[str, None] = {}
    for name in names:
        if name and name.lower() not in (s.lower() for s in seen):
            seen[name] = None
    return list(seen)


# ---------------------------------------------------------------- dates


def parse_date(value: object) -> datetime | None:
    """ISO 8601 or RFC 2822 text to an aware datetime (UTC when no offset is given), else None."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    parsed: datetime | None = None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        try:
            parsed = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            match = re.match(r"\d{4}-\d{2}-\d{2}", text)
            parsed = datetime.fromisoformat(match.group(0)) if match else None
    if parsed is None:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _first_json_date(objects: list[dict[str, Any]], key: str) -> datetime | None:
    for obj in (o for top in objects for o in _walk(top)):
        parsed = parse_date(obj.get(key))
        if parsed is not None:
            return parsed
    return None


def _dates(root: lxml.html.HtmlElement, objects: list[dict[str, Any]]) -> tuple[datetime | None, datetime | None]:
    published = _first_json_date(objects, "datePublished") or parse_date(
        _meta(root, "article:published_time", "datePublished")
    )
    if published is None:
        times = (parse_date(t.get("datetime")) for t in _elements(root, "time"))
        published = next((t for t in times if t is not None), None)
    modified = _first_json_date(objects, "dateModified") or parse_date(
        _meta(root, "article:modified_time", "og:updated_time", "dateModified")
    )
    return published, modified


def _updated_text(text: str) -> datetime | None:
    for match in _UPDATED_RE.finditer(text):
        raw = re.sub(r"(?<=\d)(st|nd|rd|th)\b", "", match.group(1), flags=re.IGNORECASE)
        raw = _norm(raw.replace(",", " ").replace(".", " "))
        raw = re.sub(r"^sept\b", "sep", raw, flags=re.IGNORECASE)
        for fmt in _TEXT_DATE_FORMATS:
            try:
                return datetime.strptime(raw, fmt).replace(tzinfo=UTC)
            except ValueError:
                continue
    return None


# ---------------------------------------------------------------- passages and FAQ


def _blocks(lines: list[str], heading_texts: set[str]) -> Iterator[tuple[bool, str]]:
    """(is_heading, text) blocks: list items and table rows that follow each other stay together."""
    group: list[str] = []
    group_kind = ""
    for line in lines:
        kind = "list" if line.startswith("- ") else "table" if line.startswith("|") else ""
        if group and (not kind or kind != group_kind):
            yield False, "\n".join(group)
            group = []
        if kind:
            group.append(line)
            group_kind = kind
        elif _norm(line).lower() in heading_texts:
            yield True, _norm(line)
        else:
            yield False, line
    if group:
        yield False, "\n".join(group)


def _split_long(block: str) -> list[str]:
    if len(block.split()) <= PASSAGE_MAX_WORDS:
        return [block]
    pieces: list[str] = []
    current: list[str] = []
    for sentence in _SENTENCE_END_RE.split(block):
        if current and len(" ".join([*current, sentence]).split()) > PASSAGE_MAX_WORDS:
            pieces.append(" ".join(current))
            current = []
        current.append(sentence)
    if current:
        pieces.append(" ".join(current))
    return pieces


def split_passages(main_text: str, headings: Iterable[str], title: str = "") -> list[str]:
    """Cut the main text into heading-prefixed passages of about 40-200 words (module docstring)."""
    heading_texts = {_norm(h).lower() for h in headings if _norm(h)}
    passages: list[str] = []
    prefix = _norm(title)
    body: list[str] = []

    def flush() -> None:
        if body:
            text = "\n".join(body)
            passages.append(f"{prefix}\n{text}" if prefix and prefix.lower() != text.lower() else text)
            body.clear()

    lines = [line.strip() for line in main_text.splitlines() if line.strip()]
    for is_heading, block in _blocks(lines, heading_texts):
        if is_heading:
            flush()
            prefix = block
            continue
        for piece in _split_long(block):
            words, size = sum(len(b.split()) for b in body), len(piece.split())
            # a short block (a list after its intro, a closing remark) joins the passage before it
            if body and (words + size > PASSAGE_MAX_WORDS or min(words, size) >= PASSAGE_MIN_WORDS):
                flush()
            body.append(piece)
    flush()
    return passages


def _following_text(el: lxml.html.HtmlElement) -> str:
    """Text after `el` up to the next heading, looking one level up when `el` is wrapped alone."""
    for start in (el, el.getparent()):
        if start is None:
            break
        parts = [start.tail or ""]
        for sib in start.itersiblings():
            if not isinstance(sib, lxml.html.HtmlElement) or sib.tag in _NON_TEXT_TAGS:
                continue
            if sib.tag in _HEADING_TAGS or next(sib.iter(*_HEADING_TAGS), None) is not None:
                break
            parts.append(sib.text_content())
            parts.append(sib.tail or "")
        text = _norm(" ".join(parts))
        if text:
            return text
    return ""


def _faq_pairs(root: lxml.html.HtmlElement, objects: list[dict[str, Any]]) -> int:
    schema_questions = 0
    for faq in (o for top in objects for o in _walk(top) if "FAQPage" in types_of(o)):
        schema_questions += sum(1 for o in _walk(faq) if "Question" in types_of(o))
    if schema_questions:
        return schema_questions
    microdata = [el for el in root.iter() if isinstance(el, lxml.html.HtmlElement) and el.get("itemtype")]
    if any("FAQPage" in (el.get("itemtype") or "") for el in microdata):
        count = sum(1 for el in microdata if short_type(el.get("itemtype", "")) == "Question")
        if count:
            return count
    pairs = 0
    for el in root.iter("h2", "h3", "h4", "h5", "h6", "dt"):
        if isinstance(el, lxml.html.HtmlElement) and _norm(el.text_content()).endswith("?"):
            pairs += len(_following_text(el)) >= 20
    for summary in _elements(root, "summary"):
        question = _norm(summary.text_content())
        details = summary.getparent()
        if question.endswith("?") and details is not None:
            pairs += len(_norm(details.text_content())) - len(question) >= 20
    return pairs


# ---------------------------------------------------------------- the page


def extract_page(html: str | bytes, url: str) -> ExtractedPage:
    """Extract main content, structure, entities, dates and evidence counts from raw HTML."""
    try:
        return _extract(html, url)
    except Exception as exc:  # the contract is "never raises": a bad page must not stop a crawl
        log.warning("extract.failed", url=url, error=repr(exc))
        return ExtractedPage(url=url)


def _extract(html: str | bytes, url: str) -> ExtractedPage:
    text = decode_html(html or b"")
    root = _parse(text)
    if root is None:
        return ExtractedPage(url=url)
    base = _base_url(root, url)
    page_host = _host(url)
    html_lang = root.get("lang") or root.get("xml:lang") or next(
        (m.get("content") for m in _elements(root, "meta")
         if (m.get("http-equiv") or "").lower() == "content-language" and m.get("content")),
        None,
    )
    title = _title(root)
    noindex, nofollow = _robots(root)
    objects, json_errors = _json_ld(root)
    types = {t for top in objects for o in _walk(top) for t in types_of(o)} | set(_microdata_types(root))
    published, modified = _dates(root, objects)

    headings = [
        (int(h.tag[1]), _norm(h.text_content()))
        for h in root.iter(*_HEADING_TAGS)
        if isinstance(h, lxml.html.HtmlElement) and _norm(h.text_content())
    ]
    main_text = _main_text(text, url, root)
    anchored = _links(root, base, page_host)
    links = [lk for _, lk in anchored]
    area = _content_area(root)
    in_area = set(area.iter("a")) if area is not root else None  # the content area's anchors, resolved once
    outbound_in_content = sum(
        1 for a, lk in anchored
        if (in_area is None or a in in_area) and not lk.internal and not _in_boilerplate(a, area)
    )

    lists = sum(1 for el in area.iter("ul", "ol") if not _in_boilerplate(el, area))
    tables = sum(
        1 for t in _elements(area, "table")
        if not _in_boilerplate(t, area)
        and (t.get("role") or "").lower() != "presentation"
        and next(iter(t.iterdescendants("table")), None) is None
    )
    images = list(_elements(root, "img"))
    body = root.find("body")
    visible = _visible_text(body if body is not None else root)

    return ExtractedPage(
        url=url,
        title=title,
        lang=_norm(html_lang) or None,
        canonical_url=_canonical(root, base),
        noindex=noindex,
        nofollow=nofollow,
        main_text=main_text,
        word_count=len(main_text.split()),
        passages=split_passages(main_text, (h for _, h in headings), title),
        headings=headings,
        links=links,
        outbound_domains=sorted({_host(lk.url).removeprefix("www.") for lk in links if not lk.internal}),
        lists=lists,
        tables=tables,
        images_without_alt=sum(1 for img in images if not _norm(img.get("alt"))),
        images=len(images),
        json_ld=objects,
        json_ld_errors=json_errors,
        schema_types=sorted(t for t in types if t),
        organization=_organization(objects),
        person_authors=_authors(root, objects),
        date_published=published,
        date_modified=modified,
        last_updated_text=_updated_text(visible),
        statistics=len(_STAT_RE.findall(main_text)),
        citations=outbound_in_content + len(_BRACKET_REF_RE.findall(main_text)),
        attributed_claims=len(_ATTRIBUTION_RE.findall(main_text)),
        faq_pairs=_faq_pairs(root, objects),
        text_html_ratio=round(len(_norm(visible)) / len(text), 4) if text else 0.0,
    )
