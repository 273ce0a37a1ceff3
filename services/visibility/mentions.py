"""Brand mentions and cited domains in one answer-engine answer.

Matching rules (each one is pinned by a test):

* Word boundaries are Unicode-aware: a match may not touch another letter or digit on either side, so
  "Acme" is not found in "Acmeville" or "ACMEcorp" but is found in "Acme's", "Acme’s", "(Acme)",
  "acme," and "Acme-powered" (a hyphen is a boundary). Plurals are not folded: "Acmes" is not "Acme".
* Matching is case-insensitive unless `BrandSpec.case_sensitive` is set, which makes every surface form
  exact, e.g. so that "Apple" is found but "apple pie" is not. Case-sensitive brands are never fuzzy.
* Multi-word names allow flexible separators: "Acme Corp" matches "Acme  Corp", "Acme-Corp",
  "Acme. Corp" and a line break between the words. An apostrophe in a name matches either apostrophe.
* Forms (name or alias) with at least `FUZZY_MIN_LETTERS` letters also match at Damerau-Levenshtein
  distance 1 (transposition, one wrong, missing or extra character, including a missing or extra space),
  reported with `fuzzy=True`. To keep ordinary words from matching ("Notion" vs "motion"), a fuzzy match
  must begin with the same letter, and with a capital where the form begins with one; a brand whose name
  is still one edit from a common word ("Notion" / "Nation") sets `BrandSpec.fuzzy=False`.
* Overlapping candidates are resolved longest first (exact before fuzzy at equal length, then brand
  order), so "Acme Cloud" in the text counts for the brand "Acme Cloud" and not also for "Acme".
* Text inside URLs (`http(s)://...` or `www....`) is never a mention; those URLs are citations, see
  `extract_citations`. A bare domain without scheme or `www.` ("acme.com") is plain text, so it mentions
  "Acme" and is not a citation.
* Text is compared after NFC normalisation (so a decomposed "Zürich" matches), but offsets and `matched`
  always refer to the text as given.
"""

from __future__ import annotations

import functools
import itertools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from llmo.core.logging import get_logger

log = get_logger(__name__)

FUZZY_MIN_LETTERS = 6

_TOKEN = re.compile(r"[^\W_]+")
# a name token may carry inner apostrophes ("McDonald's")
_NAME_TOKEN = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_SEP = r"(?:\s+|\s*[-‐‑‒–—./&·+]\s*)"
_SEP_RE = re.compile(_SEP)
_URL = re.compile(r"""(?:https?://|www\.)[^\s<>"'`\[\]{}|\\^]+""", re.IGNORECASE)
_TRAILING = ".,;:!?*_~"


@dataclass(frozen=True)
class BrandSpec:
    """A tracked brand: its display name, other names it goes by and the domains that are its own."""

    name: str
    aliases: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    is_project_brand: bool = False
    case_sensitive: bool = False
    fuzzy: bool = True  # turn off for names one typo away from a common word ("Notion" / "Nation")


@dataclass
class Mention:
    """One mention: `start`/`end` are offsets into the text as given, `matched` is that slice."""

    brand: str
    start: int
    end: int
    matched: str
    fuzzy: bool


@dataclass
class AnswerAnalysis:
    """Per-answer facts the share-of-voice statistics are computed from (keys are brand names)."""

    mentioned: dict[str, bool]
    positions: dict[str, int]
    cited: dict[str, bool]
    citations: list[str]


@dataclass(frozen=True)
class _Form:
    brand_index: int
    pattern: re.Pattern[str]
    folded: str  # tokens, case-folded, joined by one space (for fuzzy comparison)
    tokens: int
    initial_upper: bool
    fuzzy: bool


def _nfc_with_offsets(text: str) -> tuple[str, list[int]]:
    """NFC-normalise `text`, returning for each output character the offset of its source character."""
    if unicodedata.is_normalized("NFC", text):
        return text, list(range(len(text) + 1))
    out: list[str] = []
    offsets: list[int] = []
    i = 0
    while i < len(text):
        j = i + 1
        while j < len(text) and unicodedata.combining(text[j]):
            j += 1
        piece = unicodedata.normalize("NFC", text[i:j])
        out.append(piece)
        offsets.extend([i] * len(piece))
        i = j
    offsets.append(len(text))
    return "".join(out), offsets


def url_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, url) of each URL written in `text`, with trailing punctuation trimmed."""
    spans = []
    for m in _URL.finditer(text):
        url = m.group(0)
        while url and (url[-1] in _TRAILING or (url[-1] == ")" and url.count("(") < url.count(")"))):
            url = url[:-1]
        if url:
            spans.append((m.start(), m.start() + len(url), url))
    return spans


def _form_pattern(tokens: list[str], case_sensitive: bool) -> re.Pattern[str]:
    parts = ["['’]".join(re.escape(piece) for piece in re.split("['’]", t)) for t in tokens]
    flags = 0 if case_sensitive else re.IGNORECASE
    return re.compile(r"(?<![^\W_])" + _SEP.join(parts) + r"(?![^\W_])", flags)


def _damerau_at_most_one(a: str, b: str) -> bool:
    """True when the optimal-string-alignment distance between a and b is at most 1."""
    if a == b:
        return True
    la, lb = len(a), len(b)
    if abs(la - lb) > 1:
        return False
    i = 0
    while i < min(la, lb) and a[i] == b[i]:
        i += 1
    if la == lb:
        if a[i + 1 :] == b[i + 1 :]:
            return True  # one substitution
        return i + 1 < la and a[i] == b[i + 1] and a[i + 1] == b[i] and a[i + 2 :] == b[i + 2 :]
    if la > lb:
        return a[i + 1 :] == b[i:]
    return a[i:] == b[i + 1 :]


class MentionDetector:
    """Finds mentions of a fixed set of brands; build once, call on many answers (thread-safe)."""

    def __init__(self, brands: Sequence[BrandSpec]) -> None:
        self.brands = list(brands)
        self._forms: list[_Form] = []
        for index, brand in enumerate(self.brands):
            seen: set[str] = set()
            for surface in (brand.name, *brand.aliases):
                surface = unicodedata.normalize("NFC", surface)
                tokens = _NAME_TOKEN.findall(surface)
                key = " ".join(tokens) if brand.case_sensitive else " ".join(tokens).casefold()
                if not tokens:
                    log.warning("brand_form_without_letters", brand=brand.name, form=surface)
                    continue
                if key in seen:
                    continue
                seen.add(key)
                letters = sum(len(t) for t in _TOKEN.findall(surface))
                fuzzy_tokens = _TOKEN.findall(surface)
                self._forms.append(
                    _Form(
                        brand_index=index,
                        pattern=_form_pattern(tokens, brand.case_sensitive),
                        folded=" ".join(fuzzy_tokens).casefold(),
                        tokens=len(fuzzy_tokens),
                        initial_upper=surface.lstrip()[:1].isupper(),
                        fuzzy=brand.fuzzy and not brand.case_sensitive and letters >= FUZZY_MIN_LETTERS,
                    )
                )

    def _fuzzy_candidates(self, text: str, blocked: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        fuzzy_forms = [f for f in self._forms if f.fuzzy]
        if not fuzzy_forms:
            return []
        toks = list(_TOKEN.finditer(text))
        joined_ok = [bool(_SEP_RE.fullmatch(text[a.end() : b.start()])) for a, b in itertools.pairwise(toks)]
        folded = [t.group(0).casefold() for t in toks]
        found: list[tuple[int, int, int]] = []
        for form in fuzzy_forms:
            initial = form.folded[0]
            for size in {form.tokens - 1, form.tokens, form.tokens + 1} - {0}:
                for i in range(len(toks) - size + 1):
                    if folded[i][0] != initial or not all(joined_ok[i : i + size - 1]):
                        continue
                    if form.initial_upper and not toks[i].group(0)[0].isupper():
                        continue
                    candidate = " ".join(folded[i : i + size])
                    if candidate == form.folded or not _damerau_at_most_one(candidate, form.folded):
                        continue
                    start, end = toks[i].start(), toks[i + size - 1].end()
                    if not any(s < end and start < e for s, e in blocked):
                        found.append((form.brand_index, start, end))
        return found

    def mentions(self, text: str) -> list[Mention]:
        """All mentions in `text`, in text order, after overlap resolution."""
        if not text:
            return []
        norm, offsets = _nfc_with_offsets(text)
        blocked = [(s, e) for s, e, _ in url_spans(norm)]
        candidates: list[tuple[int, int, int, bool]] = []
        for form in self._forms:
            for m in form.pattern.finditer(norm):
                if not any(s < m.end() and m.start() < e for s, e in blocked):
                    candidates.append((form.brand_index, m.start(), m.end(), False))
        candidates += [(b, s, e, True) for b, s, e in self._fuzzy_candidates(norm, blocked)]
        candidates.sort(key=lambda c: (-(c[2] - c[1]), c[3], c[0], c[1]))
        taken: list[tuple[int, int, int, bool]] = []
        for cand in candidates:
            if not any(t[1] < cand[2] and cand[1] < t[2] for t in taken):
                taken.append(cand)
        taken.sort(key=lambda c: c[1])
        out = []
        for brand_index, start, end, fuzzy in taken:
            o_start, o_end = offsets[start], offsets[end]
            out.append(Mention(self.brands[brand_index].name, o_start, o_end, text[o_start:o_end], fuzzy))
        return out

    def first_positions(self, text: str) -> dict[str, int]:
        """1-based rank of each named brand by its first mention; brands not named are absent."""
        ranks: dict[str, int] = {}
        for mention in self.mentions(text):
            if mention.brand not in ranks:
                ranks[mention.brand] = len(ranks) + 1
        return ranks


def normalize_domain(value: str) -> str:
    """Host of a URL or bare domain: lower-case, no port, no trailing dot, no leading `www.`."""
    value = value.strip()
    if not value:
        return ""
    if "://" not in value:
        value = "//" + value.lstrip("/")
    try:
        host = urlsplit(value).hostname or ""
    except ValueError:
        return ""
    host = host.rstrip(".").lower()
    return host[4:] if host.startswith("www.") else host


def extract_citations(text: str, annotations: Sequence[str] = ()) -> list[str]:
    """Domains cited by an answer: URLs written in the text (bare, `[x](url)`, `<url>`) then the
    annotation URLs (OpenAI `url_citation`, Perplexity `citations`), each reduced to its host without
    `www.` (other subdomains are kept), deduplicated in order of first appearance."""
    seen: dict[str, None] = {}
    for url in [u for _, _, u in url_spans(text or "")] + list(annotations):
        domain = normalize_domain(url)
        if domain and "." in domain:
            seen.setdefault(domain, None)
    return list(seen)


def domain_matches(domain: str, brand_domains: Iterable[str]) -> bool:
    """True when `domain` equals one of `brand_domains` or is a subdomain of one."""
    host = normalize_domain(domain)
    if not host:
        return False
    for candidate in brand_domains:
        own = normalize_domain(candidate)
        if own and (host == own or host.endswith("." + own)):
            return True
    return False


@functools.lru_cache(maxsize=64)
def _detector(brands: tuple[BrandSpec, ...]) -> MentionDetector:
    return MentionDetector(brands)


def analyze_answer(text: str, brands: Sequence[BrandSpec], annotations: Sequence[str] = ()) -> AnswerAnalysis:
    """Mentions, first-mention ranks and cited brand domains of one answer."""
    detector = _detector(tuple(brands))
    positions = detector.first_positions(text)
    citations = extract_citations(text, annotations)
    return AnswerAnalysis(
        mentioned={b.name: b.name in positions for b in brands},
        positions=positions,
        cited={b.name: any(domain_matches(c, b.domains) for c in citations) for b in brands},
        citations=citations,
    )
