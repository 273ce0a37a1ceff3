"""Entity consistency: do the brand's facts agree across the pages of a crawl and with the project?

Each scored page keeps its schema.org Organization entity (JSON-LD or microdata). For every attribute
(name, description, logo, sameAs, and each key of `Brand.facts` mapped to its schema.org property),
the values observed across pages are grouped after normalisation (case, whitespace, trailing
punctuation, URL scheme and `www.`, sameAs as a set). An attribute is consistent when every observed
value equals the canonical one (from the project), or, without one, when all pages agree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from llmo.protos.visibility.v1 import visibility_service_pb2 as pb

# Brand.facts keys people write, and the schema.org Organization property holding each.
FACT_PROPERTIES = {
    "founded": "foundingDate", "founding_date": "foundingDate", "founding_year": "foundingDate",
    "foundingdate": "foundingDate", "headquarters": "address", "address": "address", "hq": "address",
    "legal_name": "legalName", "legalname": "legalName", "founder": "founder", "email": "email",
    "telephone": "telephone", "phone": "telephone", "url": "url", "website": "url", "employees": "numberOfEmployees",
}


@dataclass(frozen=True)
class PageEntity:
    url: str
    organization: dict[str, Any]


def _text(value: Any) -> str:
    if isinstance(value, dict):
        for key in ("name", "url", "@id", "streetAddress", "addressLocality"):
            if isinstance(value.get(key), str):
                parts = [str(value[k]) for k in ("streetAddress", "addressLocality", "addressCountry")
                         if isinstance(value.get(k), str)]
                return ", ".join(parts) if key in ("streetAddress", "addressLocality") else str(value[key])
        return ""
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value)
    return "" if value is None else str(value)


def normalize_value(attribute: str, value: Any) -> str:
    if attribute == "sameAs":
        items = value if isinstance(value, list) else [value]
        return " ".join(sorted({_url(_text(v)) for v in items if _text(v)}))
    text = _text(value)
    if attribute in ("logo", "url"):
        return _url(text)
    if attribute == "foundingDate":
        year = re.search(r"\b(1[5-9]\d\d|20\d\d)\b", text)
        return year.group(1) if year else text.strip().lower()
    return re.sub(r"\s+", " ", text).strip().rstrip(".").casefold()


def _url(text: str) -> str:
    text = text.strip().lower()
    text = re.sub(r"^https?://", "", text)
    text = re.sub(r"^www\.", "", text)
    return text.rstrip("/")


def _attributes(brand: pb.Brand) -> list[tuple[str, str, str]]:
    """(reported attribute name, schema.org property, canonical value) for every attribute checked."""
    out = [("name", "name", brand.name), ("description", "description", brand.description),
           ("logo", "logo", brand.logo_url), ("sameAs", "sameAs", " ".join(brand.same_as))]
    for key, value in sorted(brand.facts.items()):
        out.append((key, FACT_PROPERTIES.get(key.lower().replace(" ", "_"), key), value))
    return out


def consistency_report(brand: pb.Brand, pages: Iterable[PageEntity], crawl: str) -> pb.EntityConsistencyReport:
    pages = [p for p in pages if p.organization]
    report = pb.EntityConsistencyReport(crawl=crawl)
    for attribute, prop, canonical in _attributes(brand):
        observed: dict[str, tuple[str, list[str]]] = {}
        for page in pages:
            raw = page.organization.get(prop)
            if raw in (None, "", []):
                continue
            key = normalize_value(prop, raw)
            if not key:
                continue
            _shown, urls = observed.setdefault(key, (_text(raw) if prop != "sameAs" else key, []))
            urls.append(page.url)
        if not observed and not canonical:
            continue
        wanted = normalize_value(prop, canonical.split(" ") if prop == "sameAs" else canonical) if canonical else ""
        values = [pb.ObservedValue(value=shown, urls=sorted(urls)[:50], count=len(urls))
                  for shown, urls in sorted(observed.values(), key=lambda item: -len(item[1]))]
        if wanted:
            consistent = all(key == wanted for key in observed)
        else:
            consistent = len(observed) <= 1
        report.attributes.append(pb.EntityAttribute(attribute=attribute, canonical_value=canonical,
                                                    observed_values=values, consistent=consistent))
    if report.attributes:
        report.consistency_score = sum(a.consistent for a in report.attributes) / len(report.attributes)
    return report


def site_organization(pages: Sequence[PageEntity]) -> dict[str, Any] | None:
    """The Organization entity most pages state (by normalised name), for page-level authority scoring."""
    best: dict[str, tuple[int, dict[str, Any]]] = {}
    for page in pages:
        name = normalize_value("name", page.organization.get("name"))
        if name:
            count, org = best.get(name, (0, page.organization))
            best[name] = (count + 1, org)
    if not best:
        return None
    return max(best.values(), key=lambda item: item[0])[1]
