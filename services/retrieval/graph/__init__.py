"""Knowledge-graph mode: entities and relations of the chunks, traversed from the query's entities."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmo.core.errors import invalid_argument
from llmo.retrieval.ranking import Predicate


@dataclass
class GraphHit:
    chunk_id: int
    score: float
    matched_entities: list[str] = field(default_factory=list)
    relations: list[tuple[str, str, str]] = field(default_factory=list)


class GraphRetriever:
    """Finds chunks through the collection's knowledge graph (blocking)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def search(self, collection_pk: int, query: str, *, principals: frozenset[str], matches: Predicate,
               max_hops: int, k: int) -> list[GraphHit]:
        """Chunks linked to the query's entities within `max_hops`, best first, only from documents the
        principals may read and the filters keep (applied before `k`)."""
        raise invalid_argument("NOT_YET_SUPPORTED", "mode=SEARCH_MODE_KNOWLEDGE_GRAPH is not supported yet",
                               field="mode=SEARCH_MODE_KNOWLEDGE_GRAPH")
