"""Sitemaps per sitemaps.org: urlset, sitemapindex, gzip and plain text, parsed without XXE."""

from __future__ import annotations

import asyncio
import io
import re
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from lxml import etree

from llmo.core.logging import get_logger
from llmo.visibility.fetcher import PageFetcher

log = get_logger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
_YEAR_MONTH = re.compile(r"^(\d{4})(?:-(\d{2}))?$")


@dataclass
class SitemapEntry:
    """One page a sitemap lists."""

    loc: str
    lastmod: datetime | None = None


@dataclass
class Sitemap:
    """A parsed sitemap: page entries (urlset, text) or child sitemaps (sitemapindex)."""

    urls: list[SitemapEntry] = field(default_factory=list)
    sitemaps: list[str] = field(default_factory=list)
    error: str | None = None


def parse_lastmod(value: str) -> datetime | None:
    """A W3C datetime (`2024`, `2024-05`, `2024-05-06`, `2024-05-06T12:00Z`, with seconds, fractions
    or an offset) as an aware datetime; times without an offset are taken as UTC. None when invalid.
    """
    text = value.strip()
    partial = _YEAR_MONTH.match(text)
    try:
        if partial:
            return datetime(int(partial.group(1)), int(partial.group(2) or 1), 1, tzinfo=UTC)
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _gunzip(body: bytes, max_bytes: int) -> bytes | None:
    """Decompress gzip (concatenated members too), None when the output would exceed max_bytes."""
    out = bytearray()
    pending = body
    decompressor = zlib.decompressobj(wbits=31)
    while pending:
        out += decompressor.decompress(pending, max_bytes + 1 - len(out))
        if len(out) > max_bytes:
            return None
        if decompressor.unconsumed_tail:
            pending = decompressor.unconsumed_tail
        elif decompressor.eof and decompressor.unused_data:
            pending = decompressor.unused_data
            decompressor = zlib.decompressobj(wbits=31)
        else:
            break
    if not decompressor.eof:
        raise zlib.error("truncated gzip stream")
    return bytes(out)


def _local(tag: object) -> str:
    return etree.QName(tag).localname if isinstance(tag, str) else ""


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _parse_text(text: str, max_urls: int) -> Sitemap:
    sitemap = Sitemap()
    for line in text.splitlines():
        url = line.strip()
        if _is_http(url) and " " not in url:
            if len(sitemap.urls) >= max_urls:
                sitemap.error = "TOO_MANY_URLS"
                break
            sitemap.urls.append(SitemapEntry(url))
    return sitemap


def _parse_xml(body: bytes, max_urls: int) -> Sitemap:
    sitemap = Sitemap()
    root_kind = ""
    events = etree.iterparse(
        io.BytesIO(body),
        events=("start", "end"),
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        load_dtd=False,
        remove_comments=True,
        remove_pis=True,
    )
    try:
        for event, element in events:
            name = _local(element.tag)
            if event == "start":
                if not root_kind:
                    root_kind = name
                    if name not in ("urlset", "sitemapindex"):
                        sitemap.error = "MALFORMED_SITEMAP"
                        return sitemap
                continue
            if name not in ("url", "sitemap"):
                continue
            loc, lastmod = "", ""
            for child in element:
                child_name = _local(child.tag)
                if child_name == "loc":
                    loc = "".join(child.itertext()).strip()
                elif child_name == "lastmod":
                    lastmod = "".join(child.itertext()).strip()
            # keep memory flat on a 50 000-entry file: drop the entry and the ones before it
            element.clear()
            parent = element.getparent()
            while parent is not None and element.getprevious() is not None:
                del parent[0]
            if not _is_http(loc):
                continue
            if root_kind == "sitemapindex" and name == "sitemap":
                sitemap.sitemaps.append(loc)
            elif root_kind == "urlset" and name == "url":
                if len(sitemap.urls) >= max_urls:
                    sitemap.error = "TOO_MANY_URLS"
                    return sitemap
                sitemap.urls.append(SitemapEntry(loc, parse_lastmod(lastmod) if lastmod else None))
    except etree.XMLSyntaxError:
        sitemap.error = "MALFORMED_SITEMAP"
    if not root_kind:
        sitemap.error = "MALFORMED_SITEMAP"
    return sitemap


def parse_sitemap(body: bytes, *, max_bytes: int = 50 * 2**20, max_urls: int = 50_000) -> Sitemap:
    """Parse a sitemap body (XML urlset or sitemapindex, gzip or not, or plain text); never raises.

    Errors: "DECOMPRESSION_BOMB" (gzip inflating past max_bytes), "TOO_LARGE", "MALFORMED_SITEMAP",
    "TOO_MANY_URLS" (the first max_urls entries are kept). Entities are never resolved and DTDs
    never loaded.
    """
    try:
        if body.startswith(_GZIP_MAGIC):
            inflated = _gunzip(body, max_bytes)
            if inflated is None:
                return Sitemap(error="DECOMPRESSION_BOMB")
            body = inflated
        if len(body) > max_bytes:
            return Sitemap(error="TOO_LARGE")
        start = body[:512].lstrip(b"\xef\xbb\xbf \t\r\n")
        if start.startswith(b"<"):
            return _parse_xml(body, max_urls)
        return _parse_text(body.decode("utf-8", errors="replace"), max_urls)
    except (zlib.error, etree.LxmlError, ValueError) as exc:
        log.info("sitemap_unparseable", error=str(exc))
        return Sitemap(error="MALFORMED_SITEMAP")


async def discover(
    fetcher: PageFetcher, roots: Iterable[str], *, max_sitemaps: int = 50, max_urls: int = 50_000
) -> list[SitemapEntry]:
    """Entries of the sitemaps at `roots` and every sitemap their indexes name, breadth-first.

    Each sitemap is fetched at most once (index cycles are harmless), at most `max_sitemaps` are
    fetched, and at most `max_urls` distinct page URLs are returned.
    """
    queue: deque[str] = deque()
    seen: set[str] = set()
    for root in roots:
        if root not in seen:
            seen.add(root)
            queue.append(root)
    entries: dict[str, SitemapEntry] = {}
    fetched = 0
    while queue and fetched < max_sitemaps and len(entries) < max_urls:
        url = queue.popleft()
        fetched += 1
        result = await fetcher.fetch(url, accept=())
        if not result.ok:
            log.info("sitemap_fetch_failed", url=url, reason=result.error_reason, status=result.status)
            continue
        sitemap = await asyncio.to_thread(parse_sitemap, result.body, max_urls=max_urls)
        if sitemap.error:
            log.info("sitemap_parse_problem", url=url, error=sitemap.error)
        for child in sitemap.sitemaps:
            if child not in seen:
                seen.add(child)
                queue.append(child)
        for entry in sitemap.urls:
            if len(entries) >= max_urls:
                break
            entries.setdefault(entry.loc, entry)
    return list(entries.values())
