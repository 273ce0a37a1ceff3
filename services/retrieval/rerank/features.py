"""Features of one (query, candidate) pair, computed at serve time from the query, the candidate
list and the collection's indexes.

Every feature is relative to the query's own candidate list or bounded by construction (ranks,
fractions, scores divided by the list's best), so a model trained on some collections reads the
same scale on a collection it has never seen. Nothing here knows about a particular data set.

Terms are the BM25 index's: lower-cased, English stop words removed, Snowball-stemmed
(`llmo.retrieval.indexes.query_terms`).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmo.retrieval.indexes import query_terms
from llmo.retrieval.ranking import Candidate

FEATURE_NAMES: tuple[str, ...] = (
    "first_stage_rank",  # 1-based position in the fused list
    "first_stage_score_ratio",  # fused score / best fused score of the list
    "bm25_ratio",  # BM25 score / best BM25 score of the list (0 when no candidate shares a term)
    "bm25_rank",  # 1-based rank by BM25 within the list
    "dense_cosine",  # cosine of the query and chunk MiniLM vectors
    "dense_gap",  # dense_cosine minus the list's best cosine (<= 0)
    "dense_rank",  # 1-based rank by cosine within the list
    "term_coverage",  # share of the query's distinct terms present in the chunk
    "idf_coverage",  # the same, each term weighted by its rarity among the candidates
    "bigram_overlap",  # share of the query's adjacent term pairs present as adjacent pairs in the chunk
    "title_overlap",  # share of the query's terms in the document title and heading path
    "term_density",  # query-term occurrences / chunk terms
    "first_match",  # relative position of the first query term in the chunk (1 when none)
    "log_chunk_tokens",  # log(1 + chunk tokens)
    "chunk_index",  # position of the chunk in its document (0 = first)
    "query_terms",  # distinct terms of the query
)


@dataclass
class RerankInput:
    """What a reranker scores: a query and its candidates, with the signals read from the indexes.

    `vectors[i]` is the MiniLM vector of candidate i (unit length) and `bm25[i]` its BM25 score for
    the query over the whole collection (0 when it shares no term).
    """

    query: str
    query_vector: np.ndarray
    candidates: Sequence[Candidate]
    vectors: np.ndarray
    bm25: np.ndarray


def _rank_desc(values: np.ndarray) -> np.ndarray:
    """1-based ranks, highest value first, ties broken by list position (stable)."""
    order = np.argsort(-values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    return ranks


def _ratio(values: np.ndarray) -> np.ndarray:
    best = float(values.max()) if values.size else 0.0
    return values / best if best > 0 else np.zeros_like(values)


def _bigrams(terms: Sequence[str]) -> set[tuple[str, str]]:
    return set(itertools.pairwise(terms))


def feature_matrix(batch: RerankInput) -> np.ndarray:
    """One row of FEATURE_NAMES per candidate, float64."""
    n = len(batch.candidates)
    out = np.zeros((n, len(FEATURE_NAMES)), dtype=np.float64)
    if n == 0:
        return out
    q_terms = query_terms(batch.query)
    q_set = set(q_terms)
    q_bigrams = _bigrams(q_terms)
    texts = [c.chunk.text for c in batch.candidates]
    titles = [" ".join([c.document.display_name, *c.chunk.heading_path]) for c in batch.candidates]
    chunk_terms = [query_terms(t) for t in texts]
    title_terms = [set(query_terms(t)) for t in titles]
    # rarity of each query term among the candidates: a term every candidate has tells them apart least
    df = Counter(t for terms in chunk_terms for t in q_set.intersection(terms))
    idf = {t: math.log((n + 1) / (df.get(t, 0) + 0.5)) for t in q_set}
    idf_total = sum(idf.values())

    fused = np.array([c.fused.score for c in batch.candidates], dtype=np.float64)
    cosine = np.asarray(batch.vectors, dtype=np.float64) @ np.asarray(batch.query_vector, dtype=np.float64)
    bm25 = np.asarray(batch.bm25, dtype=np.float64)
    out[:, 0] = np.arange(1, n + 1)
    out[:, 1] = _ratio(fused)
    out[:, 2] = _ratio(bm25)
    out[:, 3] = _rank_desc(bm25)
    out[:, 4] = cosine
    out[:, 5] = cosine - cosine.max()
    out[:, 6] = _rank_desc(cosine)
    for i, (terms, heading, candidate) in enumerate(zip(chunk_terms, title_terms, batch.candidates, strict=True)):
        present = q_set.intersection(terms)
        if q_set:
            out[i, 7] = len(present) / len(q_set)
            out[i, 8] = sum(idf[t] for t in present) / idf_total if idf_total > 0 else 0.0
            out[i, 10] = len(q_set.intersection(heading)) / len(q_set)
        if q_bigrams:
            out[i, 9] = len(q_bigrams & _bigrams(terms)) / len(q_bigrams)
        hits = [j for j, t in enumerate(terms) if t in q_set]
        out[i, 11] = len(hits) / len(terms) if terms else 0.0
        out[i, 12] = hits[0] / len(terms) if hits else 1.0
        out[i, 13] = math.log1p(candidate.chunk.token_count)
        out[i, 14] = candidate.chunk.idx
    out[:, 15] = len(q_set)
    return out
