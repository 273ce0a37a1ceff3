"""Knowledge-graph mode: entities and relations of the chunks, traversed from the query's entities.

A search in SEARCH_MODE_KNOWLEDGE_GRAPH:

1. **Links** the query to the collection's entities: the keys of the entities the local extractor
   (`graph.extract`) finds in the query, and of every 1-4 token sequence of the query (not starting
   or ending with a stop word), looked up among the collection's entity keys; overlapping matches
   keep the longest (then the leftmost). These are the seeds, at distance 0.
2. **Expands** `max_hops` hops over relations: at hop h, every relation touching an entity first
   reached at hop h-1 is traversed and its other end, if new, is at distance h. Only relations
   stated by chunks of documents the principals may read and the filters keep are traversed, so a
   denied document neither adds an entity nor shortens a distance. At most `MAX_ENTITIES` entities.
3. **Scores** every chunk of a readable, kept document that mentions a reached entity:
   the sum over its distinct reached entities of `DECAY ** distance`, plus `RELATION_WEIGHT *
   DECAY ** min(distance of the ends)` for each traversed relation the chunk states. Best first,
   ties by chunk id; cut to `k` after access and filters were applied.
4. Each hit carries its **evidence**: the reached entities it mentions (as that chunk's document
   writes them, nearest first) and the traversed relations it states.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llmo.core.errors import failed_precondition
from llmo.retrieval import ranking
from llmo.retrieval.graph.extract import STOP_WORDS, extract, normalise
from llmo.retrieval.ranking import Predicate
from llmo.retrieval.storage import MentionRow, RelationRow, RetrievalStore

DECAY = 0.5
RELATION_WEIGHT = 0.5
MAX_ENTITIES = 2000
MAX_NGRAM = 4

_QUERY_TOKEN = re.compile(r"(?:[A-Za-z]\.){2,}|\w+(?:[-'’&]\w+)*['’]?")


@dataclass
class GraphHit:
    chunk_id: int
    score: float
    matched_entities: list[str] = field(default_factory=list)
    relations: list[tuple[str, str, str]] = field(default_factory=list)


def query_keys(query: str) -> list[tuple[int, int, str]]:
    """(start, end, key) of every span of the query that may name an entity: the extractor's
    mentions and the 1-4 token sequences (whitespace-separated) that neither start nor end with a
    stop word."""
    spans = {(m.start, m.end, m.key) for m in extract(query).mentions}
    tokens = [(m.start(), m.end()) for m in _QUERY_TOKEN.finditer(query)]
    for i in range(len(tokens)):
        for n in range(1, MAX_NGRAM + 1):
            if i + n > len(tokens):
                break
            if n > 1 and not query[tokens[i + n - 2][1]:tokens[i + n - 1][0]].isspace():
                break
            first, last = (normalise(query[s:e]) for s, e in (tokens[i], tokens[i + n - 1]))
            if first in STOP_WORDS or last in STOP_WORDS:
                continue
            key = normalise(query[tokens[i][0]:tokens[i + n - 1][1]])
            if key:
                spans.add((tokens[i][0], tokens[i + n - 1][1], key))
    return sorted(spans)


def link(spans: Iterable[tuple[int, int, str]], known: dict[str, int]) -> list[int]:
    """Entity ids of the known spans, overlapping ones resolved to the longest, then leftmost."""
    chosen: list[tuple[int, int, str]] = []
    for start, end, key in sorted((s for s in spans if s[2] in known), key=lambda s: (-(s[1] - s[0]), s[0])):
        if all(end <= s or start >= e for s, e, _ in chosen):
            chosen.append((start, end, key))
    return list(dict.fromkeys(known[key] for _, _, key in sorted(chosen)))


@dataclass
class Traversal:
    """Entities reached (id -> distance) and the relations traversed to reach them (by id)."""

    distance: dict[int, int]
    relations: dict[int, RelationRow]


def expand(seeds: Iterable[int], max_hops: int, relations_of: Callable[[list[int]], list[RelationRow]],
           allowed: Callable[[RelationRow], bool]) -> Traversal:
    """Breadth-first over relations: `relations_of(ids)` lists the relations touching `ids`,
    `allowed(relation)` says whether it may be traversed."""
    distance = {e: 0 for e in seeds}
    traversed: dict[int, RelationRow] = {}
    frontier = sorted(distance)
    for hop in range(1, max_hops + 1):
        if not frontier:
            break
        reached: list[int] = []
        for r in relations_of(frontier):
            if r.id in traversed or not allowed(r):
                continue
            for end in (r.subject_id, r.object_id):
                if end not in distance and len(distance) < MAX_ENTITIES:
                    distance[end] = hop
                    reached.append(end)
            if r.subject_id in distance and r.object_id in distance:
                traversed[r.id] = r
        frontier = sorted(reached)
    return Traversal(distance, traversed)


def score(traversal: Traversal, mentions: Iterable[MentionRow]) -> list[GraphHit]:
    """Hits of the chunks mentioning reached entities (see the module docstring), best first."""
    names: dict[int, dict[int, str]] = {}
    for m in mentions:
        if m.entity_id in traversal.distance:
            names.setdefault(m.chunk_id, {}).setdefault(m.entity_id, m.name)
    stated: dict[int, list[RelationRow]] = {}
    for r in traversal.relations.values():
        stated.setdefault(r.chunk_id, []).append(r)
    hits = []
    d = traversal.distance
    for chunk_id, entities in names.items():
        relations = sorted(stated.get(chunk_id, []), key=lambda r: (min(d[r.subject_id], d[r.object_id]), r.id))
        value = sum(DECAY ** d[e] for e in entities) + sum(
            RELATION_WEIGHT * DECAY ** min(d[r.subject_id], d[r.object_id]) for r in relations)
        ordered = sorted(entities, key=lambda e: (d[e], entities[e].casefold(), e))
        hits.append(GraphHit(chunk_id, value, [entities[e] for e in ordered], [
            (entities.get(r.subject_id, ""), r.predicate, entities.get(r.object_id, "")) for r in relations]))
    hits.sort(key=lambda h: (-h.score, h.chunk_id))
    return hits


class GraphRetriever:
    """Finds chunks through the collection's knowledge graph (blocking)."""

    def __init__(self, store: RetrievalStore) -> None:
        self.store = store

    def search(self, collection_pk: int, query: str, *, principals: frozenset[str], matches: Predicate,
               max_hops: int, k: int) -> list[GraphHit]:
        """Chunks linked to the query's entities within `max_hops`, best first, only from documents the
        principals may read and the filters keep (applied before `k`)."""
        if not self.store.graph_enabled(collection_pk):
            raise failed_precondition("KNOWLEDGE_GRAPH_DISABLED", "mode=SEARCH_MODE_KNOWLEDGE_GRAPH needs a collection "
                                      "created with knowledge_graph_enabled", field="mode")
        spans = query_keys(query)
        seeds = link(spans, self.store.entities_by_key(collection_pk, [key for _, _, key in spans]))
        if not seeds:
            return []
        readable: dict[str, bool] = {}

        def keep(document_ids: Iterable[str]) -> None:
            unknown = [d for d in set(document_ids) if d not in readable]
            access = self.store.document_access(collection_pk, unknown)
            for d in unknown:
                acl, metadata = access.get(d, (None, None))
                readable[d] = acl is not None and ranking.visible(acl, principals) and matches(metadata or {})

        def relations_of(ids: list[int]) -> list[RelationRow]:
            rows = self.store.relations_touching(collection_pk, ids)
            keep(r.document_id for r in rows)
            return rows

        traversal = expand(seeds, max(1, max_hops), relations_of, lambda r: readable[r.document_id])
        mentions = self.store.mentions_of(collection_pk, list(traversal.distance))
        keep(m.document_id for m in mentions)
        hits = score(traversal, (m for m in mentions if readable[m.document_id]))
        return hits[:k]
