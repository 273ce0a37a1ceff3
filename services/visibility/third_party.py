"""Third-party mention sources: pages on other sites (reviews, press, directories) that may name the brand.

The crawl fetches each of a project's `mention_sources` once and reads its main content with the
share-of-voice mention detector (`mentions.MentionDetector`); how many name the brand is the authority
pillar's `third_party_mentions` signal for every page of that crawl. This module is the pure part: which
URLs to fetch and what one page's text says.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from llmo.protos.visibility.v1 import visibility_service_pb2 as pb
from llmo.visibility import urls
from llmo.visibility.mentions import MentionDetector

SNIPPET_CHARS = 240
ELLIPSIS = "\u2026"
_SPACE = re.compile(r"\s+")


def distinct_sources(sources: Iterable[str]) -> list[str]:
    """The sources normalised, each once, in the order given (URLs that do not normalise are left out)."""
    seen: dict[str, None] = {}
    for source in sources:
        url = urls.normalize_url(source)
        if url is not None:
            seen.setdefault(url, None)
    return list(seen)


def snippet(text: str, start: int, end: int, width: int = SNIPPET_CHARS) -> str:
    """At most `width` characters of `text` around `text[start:end]`, whitespace collapsed, cut between
    words where it can be, with an ellipsis on each side that was cut."""
    pad = max(0, (width - 2 - (end - start)) // 2)
    lo, hi = max(0, start - pad), min(len(text), end + pad)
    if lo > 0:  # start after the first whitespace in the window, so no word is cut in half
        space = _SPACE.search(text, lo, start)
        lo = space.end() if space is not None else lo
    if hi < len(text):
        spaces = list(_SPACE.finditer(text, end, hi))
        hi = spaces[-1].start() if spaces else hi
    body = _SPACE.sub(" ", text[lo:hi]).strip()
    out = (ELLIPSIS if lo > 0 else "") + body + (ELLIPSIS if hi < len(text) else "")
    return out[:width]


def read_source(url: str, text: str, detector: MentionDetector, brand: str) -> pb.MentionSource:
    """What one source's text says: whether (and how often) it names `brand`, the first mention as
    written with its context, and the other brands of the detector it names, in order of first mention."""
    found = detector.mentions(text)
    own = [m for m in found if m.brand == brand]
    others: dict[str, None] = {}
    for mention in found:
        if mention.brand != brand:
            others.setdefault(mention.brand, None)
    source = pb.MentionSource(url=url, mentions_brand=bool(own), brand_mentions=len(own), competitors=list(others))
    if own:
        source.matched = own[0].matched
        source.snippet = snippet(text, own[0].start, own[0].end)
    return source


def mentions_count(sources: Sequence[pb.MentionSource]) -> int | None:
    """How many sources name the brand; None without sources (the signal is then left out, not zero)."""
    return sum(1 for s in sources if s.mentions_brand) if sources else None
