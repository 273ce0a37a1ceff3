"""Query understanding: what the retrievers search for, before any index is touched.

A search runs one or more query variants. Each variant is a text the sparse retriever searches
and the texts whose mean embedding the dense retriever searches. Without expansion or HyDE the
plan is the query itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmo.core.errors import invalid_argument
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.retrieval.settings import RetrievalSettings

MAX_HISTORY_TURNS = 32
MAX_VARIANTS = 8
DEFAULT_VARIANTS = 3


@dataclass
class QueryVariant:
    text: str
    """Searched by BM25."""
    embed_texts: list[str]
    """Embedded, averaged and searched by the dense retriever."""


@dataclass
class QueryPlan:
    variants: list[QueryVariant]
    """The first is the original (or history-condensed) query."""
    expanded_queries: list[str] = field(default_factory=list)
    hypothetical_document: str = ""
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def query(self) -> str:
        return self.variants[0].text

    @classmethod
    def plain(cls, query: str) -> QueryPlan:
        return cls([QueryVariant(query, [query])])


def check_options(request: pb.SearchRequest, settings: RetrievalSettings) -> None:
    """Bounds of the query-understanding fields, checked before any work."""
    if len(request.history) > MAX_HISTORY_TURNS:
        raise invalid_argument("INVALID_HISTORY", f"at most {MAX_HISTORY_TURNS} history turns",
                               max_turns=MAX_HISTORY_TURNS)
    for turn in request.history:
        if turn.role not in ("user", "assistant"):
            raise invalid_argument("INVALID_HISTORY", "a history turn's role is 'user' or 'assistant'")
        if len(turn.content) > settings.max_query_chars:
            raise invalid_argument("INVALID_HISTORY", f"a history turn is at most {settings.max_query_chars} characters",
                                   max_length=settings.max_query_chars)
    if not 0 <= request.query_expansion.variants <= MAX_VARIANTS:
        raise invalid_argument("INVALID_STAGE_OPTIONS", f"query_expansion.variants must be in 0..{MAX_VARIANTS}",
                               field="query_expansion.variants")
    for field_name, model in (("query_expansion.model", request.query_expansion.model), ("hyde.model", request.hyde.model)):
        if len(model) > 256:
            raise invalid_argument("INVALID_STAGE_OPTIONS", f"{field_name} is at most 256 characters", field=field_name)


async def plan_query(request: pb.SearchRequest, generator: Any, settings: RetrievalSettings, stages: Any) -> QueryPlan:
    """The variants to search. Expansion and HyDE go through the generator; a generator that fails
    or misses its deadline leaves the plain query (the stage reports `fell_back`)."""
    if request.query_expansion.enabled or request.hyde.enabled:
        field_name = "query_expansion.enabled" if request.query_expansion.enabled else "hyde.enabled"
        raise invalid_argument("NOT_YET_SUPPORTED", f"{field_name} is not supported yet by this retrieval service",
                               field=field_name)
    return QueryPlan.plain(request.query)
