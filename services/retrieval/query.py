"""Query understanding: what the retrievers search for, before any index is touched.

A search runs one or more query variants. Each variant is a text the sparse retriever searches
and the texts whose mean embedding the dense retriever searches. Without expansion or HyDE the
plan is the query itself.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

from llmo.core.errors import invalid_argument
from llmo.core.logging import get_logger
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.retrieval.generator import Generation, Generator, GeneratorError
from llmo.retrieval.settings import RetrievalSettings

log = get_logger(__name__)

MAX_HISTORY_TURNS = 32
MAX_VARIANTS = 8
DEFAULT_VARIANTS = 3
HYDE_MAX_CHARS = 4000


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


async def plan_query(request: pb.SearchRequest, generator: Generator | None, settings: RetrievalSettings,
                     stages: Any, *, tenant: str) -> QueryPlan:
    """The variants to search. Expansion (with the history) and HyDE run concurrently through the
    generator; one that fails or misses its deadline leaves the plain query for its part, and its
    stage reports `fell_back` with the reason."""
    expand, hyde = request.query_expansion.enabled, request.hyde.enabled
    if not (expand or hyde):
        return QueryPlan.plain(request.query)
    assert generator is not None  # Searcher.check refuses these options without one
    user = request.attribution.user

    async def run(name: str, messages: list[dict[str, str]], model: str) -> Generation | None:
        started = time.perf_counter()
        try:
            generation = await generator.complete(messages, purpose=name, tenant=tenant, model=model, user=user)
        except GeneratorError as error:
            log.warning("generator fell back", stage=name, reason=error.reason, detail=error.detail)
            stages.fell_back(name, error.reason, (time.perf_counter() - started) * 1000)
            return None
        stages.reports.append(pb.StageReport(stage=name, latency_ms=(time.perf_counter() - started) * 1000,
                                             items=1))
        return generation

    variants = request.query_expansion.variants or DEFAULT_VARIANTS
    history = list(request.history)
    jobs = [run("query_expansion", expansion_messages(request.query, history, variants), request.query_expansion.model)
            if expand else _none(),
            run("hyde", hyde_messages(request.query, history), request.hyde.model) if hyde else _none()]
    expanded, hypothetical = await asyncio.gather(*jobs)
    plan = QueryPlan.plain(request.query)
    if expanded is not None:
        standalone, paraphrases = parse_expansion(expanded.text, request.query, with_history=bool(history),
                                                  wanted=variants, max_chars=settings.max_query_chars)
        report = next(r for r in stages.reports if r.stage == "query_expansion")
        report.items = len(paraphrases)
        plan = QueryPlan([QueryVariant(standalone, [standalone])] + [QueryVariant(p, [p]) for p in paraphrases],
                         expanded_queries=([standalone] if standalone != request.query else []) + paraphrases)
    if hypothetical is not None and hypothetical.text:
        plan.hypothetical_document = hypothetical.text[:HYDE_MAX_CHARS]
        plan.variants[0].embed_texts.append(plan.hypothetical_document)
    for generation in (expanded, hypothetical):
        if generation is not None:
            plan.input_tokens += generation.input_tokens
            plan.output_tokens += generation.output_tokens
    return plan


async def _none() -> None:
    return None


def _conversation(history: list[pb.ConversationTurn]) -> str:
    return "\n".join(f"{turn.role}: {turn.content}" for turn in history)


def expansion_messages(query: str, history: list[pb.ConversationTurn], variants: int) -> list[dict[str, str]]:
    """The multi-query prompt; with history the first line asked for is the standalone query."""
    if history:
        prompt = (f"Conversation so far:\n{_conversation(history)}\n\nFollow-up question: {query}\n\n"
                  "On the first line, rewrite the follow-up question as one standalone search query, resolving "
                  "every pronoun and reference from the conversation. Then write "
                  f"{variants} different search queries asking for the same information in other words (the terms a "
                  "relevant document would use), one per line. No numbering, no commentary.")
    else:
        prompt = (f"Question: {query}\n\nWrite {variants} different search queries asking for the same information "
                  "in other words (synonyms, the terms a relevant document would use), one per line. "
                  "No numbering, no commentary.")
    return [{"role": "system", "content": "You rewrite questions into search queries for a document search engine."},
            {"role": "user", "content": prompt}]


def hyde_messages(query: str, history: list[pb.ConversationTurn]) -> list[dict[str, str]]:
    """The HyDE prompt: a short passage that would answer the question (its facts may be wrong;
    only its wording is used, to find real passages like it)."""
    context = f"Conversation so far:\n{_conversation(history)}\n\n" if history else ""
    return [{"role": "system", "content": "You write short reference passages."},
            {"role": "user", "content": f"{context}Question: {query}\n\nWrite a passage of three to five sentences "
                                        "that answers the question the way a reference document or manual would. "
                                        "Only the passage."}]


_BULLET = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d{1,2}[.):]|q\d{1,2}[.):])\s*", re.IGNORECASE)


def parse_expansion(text: str, query: str, *, with_history: bool, wanted: int, max_chars: int) -> tuple[str, list[str]]:
    """(standalone query, paraphrases) from the generator's lines: bullets, numbering and quotes
    stripped, blank lines and repeats (of the query too) dropped, each cut to `max_chars`."""
    lines = []
    for raw in text.splitlines():
        line = _BULLET.sub("", raw).strip().strip('"\'').strip()
        if line:
            lines.append(line)
    standalone = query
    if with_history and lines:
        standalone = lines.pop(0)[:max_chars]
    seen = {standalone.casefold(), query.casefold()}
    paraphrases = []
    for line in lines:
        if line.casefold() not in seen:
            seen.add(line.casefold())
            paraphrases.append(line[:max_chars])
    return standalone, paraphrases[:wanted]
