"""The "llm" entity extractor of knowledge-graph mode: each chunk's entities and relations asked of the
OpenAI-compatible generator endpoint (`LLMO_RETRIEVAL_GENERATOR_URL`, the router by default) as JSON.

One chat completion per chunk, at most `LLMO_RETRIEVAL_GRAPH_EXTRACTOR_CONCURRENCY` in flight per
document, each within `LLMO_RETRIEVAL_GRAPH_EXTRACTOR_TIMEOUT_S` (and the ingest stream's deadline),
all of a document's within `LLMO_RETRIEVAL_GRAPH_EXTRACTOR_DOCUMENT_TIMEOUT_S`. Each call is charged
to the collection's tenant (`x-llmo-tenant`) with a request id of its own
(`<ingest request id>:graph_extract:<document position>:<chunk index>`).

The answer must be one JSON object (code fences around it are tolerated):
``{"entities": [{"name": str, "type": str}], "relations": [{"subject": str, "predicate": str,
"object": str}]}``. Validation and normalisation, per chunk (the chunk is the provenance of all it
yields):

- not JSON, not an object, or `entities` / `relations` not lists: the whole answer is rejected;
- an entity needs a non-empty `name` of at most 200 characters and a string `type` (at most 64
  characters; checked, not stored: the graph tables keep keys and names) and must occur in the
  chunk's text (case-insensitive, any whitespace), so nothing the model invents enters the graph;
  its name is the chunk's own spelling, its key `graph.extract.normalise` of it (as the local
  extractor's, so query linking and search are unchanged);
- a relation needs string `subject`, `predicate` and `object`; its ends must be entities of the
  chunk (listed, or occurring in its text), different from each other; the predicate is lower-cased,
  whitespace collapsed, cut to 128 characters, `related_to` when empty;
- anything else in an item or the answer is ignored; invalid items are dropped; at most 256
  entities and 512 relations per chunk.

A chunk whose call fails, times out or whose answer is rejected gets the local extractor's graph
for that chunk (extracted over the whole document, as `local` collections do); the fallbacks are
counted per document and in `llmo_retrieval_graph_extraction_fallbacks_total{reason}`. The ingest
never fails because of the extractor.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter as PromCounter

from llmo.chat_client import ChatClient, ChatError
from llmo.core.logging import get_logger
from llmo.retrieval.graph.extract import (
    MAX_CHUNK_ENTITIES,
    MAX_CHUNK_RELATIONS,
    MAX_NAME_CHARS,
    MAX_PREDICATE_CHARS,
    RELATED_TO,
    chunk_graphs,
    normalise,
)
from llmo.retrieval.storage import ChunkGraph

log = get_logger(__name__)

MAX_TYPE_CHARS = 64
TIMEOUT, FAILED, INVALID, UNAVAILABLE = "GENERATOR_TIMEOUT", "GENERATOR_FAILED", "EXTRACTION_INVALID", \
    "GENERATOR_UNAVAILABLE"

FALLBACKS = PromCounter("llmo_retrieval_graph_extraction_fallbacks_total",
                        "Chunks of `llm` knowledge-graph collections whose graph came from the local extractor",
                        ["reason"])

SYSTEM = ("You extract a knowledge graph from text. You answer with one JSON object and nothing else: no "
          "prose, no code fences.")
INSTRUCTIONS = """Extract the named entities of the text (people, organizations, places, products, projects, works, \
events, and named concepts) and the relations the text states between them.

Answer with a JSON object of exactly this shape:
{"entities": [{"name": "...", "type": "person|organization|location|product|project|work|event|concept|other"}],
 "relations": [{"subject": "...", "predicate": "...", "object": "..."}]}

Rules: copy every name exactly as the text writes it; the subject and the object of a relation are names \
from "entities"; the predicate is the short verb phrase of the text that links them, in lower case (for \
example "worked with", "designed"). Use empty lists when there is nothing to extract.

Text:
"""


class BadExtraction(ValueError):
    pass


@dataclass
class Extracted:
    """The graph of each chunk, and how many chunks fell back to the local extractor (by reason)."""

    graphs: list[ChunkGraph]
    fallbacks: Counter[str] = field(default_factory=Counter)

    @property
    def fallback_chunks(self) -> int:
        return sum(self.fallbacks.values())


def extraction_messages(chunk_text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": INSTRUCTIONS + chunk_text}]


def _json_object(answer: str) -> dict[str, Any]:
    start, end = answer.find("{"), answer.rfind("}")
    if start < 0 or end < start:
        raise BadExtraction("the answer holds no JSON object")
    try:
        parsed = json.loads(answer[start:end + 1])
    except (ValueError, RecursionError) as error:  # RecursionError: nesting deeper than the parser goes
        raise BadExtraction(f"the answer is not JSON: {error!r}") from None
    if not isinstance(parsed, dict):
        raise BadExtraction("the answer is not a JSON object")
    if not isinstance(parsed.get("entities"), list) or not isinstance(parsed.get("relations"), list):
        raise BadExtraction("`entities` and `relations` must be lists")
    return parsed


def _surface(chunk_text: str, name: str) -> str | None:
    """The chunk's own spelling of `name` (matched case-insensitively across any whitespace), or None."""
    words = name.split()
    if not words:
        return None
    found = re.search(r"\s+".join(re.escape(w) for w in words), chunk_text, re.IGNORECASE)
    return " ".join(found.group(0).split()) if found else None


def _display(surface: str) -> str:
    for suffix in ("'s", "’s"):
        if surface.endswith(suffix) and len(surface) > len(suffix):
            return surface[:-len(suffix)]
    return surface


def parse_graph(answer: str, chunk_text: str) -> ChunkGraph:
    """The validated, normalised graph of one chunk from the generator's answer (see the module
    docstring); BadExtraction when the answer as a whole is not the JSON asked for."""
    parsed = _json_object(answer)
    graph = ChunkGraph()

    def entity(name: Any) -> str | None:
        """The key of `name` as an entity of the chunk (added when it occurs in the text), or None."""
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
            return None
        key = normalise(name)
        if key in graph.entities:
            return key
        surface = _surface(chunk_text, name)
        if surface is None or len(graph.entities) >= MAX_CHUNK_ENTITIES:
            return None
        key = normalise(surface)
        if not key or len(key) > MAX_NAME_CHARS:
            return None
        graph.entities.setdefault(key, _display(surface))
        return key

    for item in parsed["entities"]:
        if isinstance(item, dict) and isinstance(item.get("type"), str) and len(item["type"]) <= MAX_TYPE_CHARS:
            entity(item.get("name"))
    relations: dict[tuple[str, str, str], None] = {}
    for item in parsed["relations"]:
        if not isinstance(item, dict) or not isinstance(item.get("predicate"), str):
            continue
        subject, obj = entity(item.get("subject")), entity(item.get("object"))
        if subject is None or obj is None or subject == obj or len(relations) >= MAX_CHUNK_RELATIONS:
            continue
        predicate = " ".join(item["predicate"].lower().split())[:MAX_PREDICATE_CHARS].strip()
        relations.setdefault((subject, predicate or RELATED_TO, obj), None)
    graph.relations = list(relations)
    return graph


class LlmExtractor:
    def __init__(self, client: ChatClient | None, *, model: str = "", concurrency: int = 4,
                 document_timeout_s: float = 120.0) -> None:
        self.client, self.model = client, model
        self.concurrency, self.document_timeout_s = concurrency, document_timeout_s

    async def chunk_graphs(self, text: str, spans: Sequence[tuple[int, int]], *, tenant: str, purpose: str
                           ) -> Extracted:
        """The graph of each chunk `text[start:end]`, in the order of `spans`; `purpose` names the
        document in the request ids (`<purpose>:<chunk index>`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.document_timeout_s
        gate = asyncio.Semaphore(self.concurrency)

        async def one(index: int, start: int, end: int) -> tuple[ChunkGraph | None, str]:
            if self.client is None:
                return None, UNAVAILABLE
            async with gate:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None, TIMEOUT
                chunk_text = text[start:end]
                try:
                    async with asyncio.timeout(remaining):
                        done = await self.client.complete(extraction_messages(chunk_text), tenant=tenant,
                                                          purpose=f"{purpose}:{index}", model=self.model)
                except TimeoutError:
                    return None, TIMEOUT
                except ChatError as error:
                    return None, TIMEOUT if error.reason == "TIMEOUT" else FAILED
                try:
                    return parse_graph(done.text, chunk_text), ""
                except BadExtraction as error:
                    log.info("graph extraction answer rejected", purpose=purpose, chunk=index, error=str(error))
                    return None, INVALID

        answers = await asyncio.gather(*(one(i, s, e) for i, (s, e) in enumerate(spans)))
        out = Extracted([graph or ChunkGraph() for graph, _ in answers])
        failed = [i for i, (graph, _) in enumerate(answers) if graph is None]
        if failed:
            fallback = await asyncio.to_thread(chunk_graphs, text, list(spans))
            for i in failed:
                out.graphs[i] = fallback[i]
                out.fallbacks[answers[i][1]] += 1
            for reason, count in out.fallbacks.items():
                FALLBACKS.labels(reason=reason).inc(count)
            log.warning("graph extraction fell back to the local extractor", purpose=purpose, chunks=len(failed),
                        of=len(spans), reasons=dict(out.fallbacks))
        return out
