"""Coverage gaps: tracked queries where the brand is missing from answers, or that no crawled passage
answers well.

For each query of a share-of-voice run:
- an engine *omits* the brand when none of its answers to the query names the brand;
- the query's best passage is the crawled passage (of the latest succeeded crawl) with the highest
  MiniLM cosine similarity to the query.

The query is a gap of kind
- NO_CONTENT when the best passage's similarity is below the threshold (nothing on the site answers it),
- else COMPETITOR_ONLY when an omitting engine's answers name or cite a competitor,
- else NOT_CITED when some engine omits the brand.

`opportunity` = (engines omitting the brand / engines) x (0.5 + 0.5 x share of the omitting engines
whose answers name a competitor); a NO_CONTENT query where every engine names the brand anyway still
ranks with opportunity 0.1, since the answers then rest on other sites' pages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmo.protos.visibility.v1 import visibility_service_pb2 as pb
from llmo.visibility.mentions import BrandSpec, domain_matches
from llmo.visibility.sov_stats import Answer

NEAREST = 3
PASSAGE_PREVIEW = 400


@dataclass(frozen=True)
class Passages:
    """Every crawled passage with its page URL and MiniLM vector."""

    urls: list[str]
    texts: list[str]
    vectors: np.ndarray  # (passages, 384), L2-normalised

    @classmethod
    def empty(cls) -> Passages:
        return cls([], [], np.zeros((0, 384), dtype=np.float32))


def coverage_gaps(queries: Sequence[str], query_vectors: np.ndarray, answers: Sequence[Answer],
                  brands: Sequence[BrandSpec], engines: Sequence[str], passages: Passages,
                  threshold: float) -> list[pb.CoverageGap]:
    brand = brands[0].name
    competitors = [b for b in brands[1:]]
    sims = query_vectors @ passages.vectors.T if len(passages.texts) else np.zeros((len(queries), 0))
    gaps: list[pb.CoverageGap] = []
    for qi, query in enumerate(queries):
        mine = [a for a in answers if a.prompt == query]
        omitting = [e for e in engines if any(a.engine == e for a in mine) and
                    not any(a.analysis.mentioned.get(brand) for a in mine if a.engine == e)]
        present = sorted({c.name for c in competitors for a in mine if a.engine in omitting and
                          (a.analysis.mentioned.get(c.name) or a.analysis.cited.get(c.name))})
        with_competitor = [e for e in omitting if any(
            a.analysis.mentioned.get(c.name) or a.analysis.cited.get(c.name)
            for c in competitors for a in mine if a.engine == e)]
        cited = sorted({d for a in mine if a.engine in omitting for d in a.analysis.citations
                        if any(domain_matches(d, c.domains) for c in competitors)})
        row = sims[qi] if sims.shape[1] else np.zeros(0)
        order = np.argsort(-row)[:NEAREST] if row.size else np.zeros(0, dtype=int)
        best = float(row[order[0]]) if row.size else 0.0
        answered_engines = [e for e in engines if any(a.engine == e for a in mine)]
        if best < threshold:
            kind = pb.GAP_KIND_NO_CONTENT
        elif present:
            kind = pb.GAP_KIND_COMPETITOR_ONLY
        elif omitting:
            kind = pb.GAP_KIND_NOT_CITED
        else:
            continue
        missing_share = len(omitting) / len(answered_engines) if answered_engines else 1.0
        competitor_share = len(with_competitor) / len(omitting) if omitting else 0.0
        opportunity = missing_share * (0.5 + 0.5 * competitor_share)
        if kind == pb.GAP_KIND_NO_CONTENT and not omitting:
            opportunity = 0.1
        gap = pb.CoverageGap(query=query, kind=kind, engines=omitting, competitors_present=present,
                             best_page_url=passages.urls[order[0]] if row.size else "",
                             best_page_similarity=round(best, 4), opportunity=round(opportunity, 4),
                             recommendation=_recommendation(kind, query, present), competitor_citations=cited)
        for index in order:
            gap.nearest_passages.append(pb.PassageMatch(url=passages.urls[index],
                                                        text=passages.texts[index][:PASSAGE_PREVIEW],
                                                        similarity=round(float(row[index]), 4)))
        gaps.append(gap)
    gaps.sort(key=lambda g: (-g.opportunity, g.query))
    return gaps


def _recommendation(kind: int, query: str, competitors: Sequence[str]) -> str:
    if kind == pb.GAP_KIND_NO_CONTENT:
        return (f"No page answers \u201c{query}\u201d: publish a page with a self-contained answer passage "
                "(question as a heading, a direct answer in the first 2-3 sentences, facts with sources).")
    if kind == pb.GAP_KIND_COMPETITOR_ONLY:
        names = ", ".join(competitors[:3])
        return (f"Answers name {names} but not the brand: strengthen the page that covers this query with "
                "comparisons, statistics and citations, and earn third-party mentions on the sites engines cite.")
    return ("A page covers this query but answers omit the brand: make the brand explicit in the answer "
            "passage, add Organization markup, and get the page cited by sources the engines use.")
