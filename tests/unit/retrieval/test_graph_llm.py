"""The "llm" entity extractor: validation and normalisation of the generator's JSON, and the
extractor against a real OpenAI-compatible HTTP server on a socket (it stands in for a paid LLM
API) answering good JSON, garbage, errors, and never (timeouts): every failure falls back to the
local extractor for that chunk and is counted."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from llmo.chat_client import ChatClient
from llmo.core import context as ctx
from llmo.retrieval.graph.extract import MAX_CHUNK_ENTITIES, MAX_PREDICATE_CHARS, RELATED_TO, chunk_graphs
from llmo.retrieval.graph.llm import BadExtraction, LlmExtractor, extraction_messages, parse_graph
from llmo.retrieval.storage import ChunkGraph
from llmo.router.fake_backend import FakeBackend

CURIE = "Marie Curie discovered polonium with Pierre Curie in Paris."
GOOD = {"entities": [{"name": "Marie Curie", "type": "person"}, {"name": "POLONIUM", "type": "concept"},
                     {"name": "Pierre  Curie", "type": "person"}, {"name": "Albert Einstein", "type": "person"}],
        "relations": [{"subject": "Marie Curie", "predicate": "  Discovered ", "object": "polonium"},
                      {"subject": "marie curie", "predicate": "worked with", "object": "Pierre Curie"},
                      {"subject": "Marie Curie", "predicate": "met", "object": "Albert Einstein"},
                      {"subject": "Marie Curie", "predicate": "", "object": "Paris"},
                      {"subject": "Marie Curie", "predicate": "is", "object": "Marie Curie"}]}


def test_good_json_is_validated_grounded_and_normalised() -> None:
    graph = parse_graph(json.dumps(GOOD), CURIE)
    # names are the chunk's own spelling; Albert Einstein is not in the chunk, so neither he nor his relation
    # enter; Paris, named only by a relation but present in the text, does; a relation needs two ends
    assert graph.entities == {"marie curie": "Marie Curie", "polonium": "polonium", "pierre curie": "Pierre Curie",
                              "paris": "Paris"}
    assert graph.relations == [("marie curie", "discovered", "polonium"), ("marie curie", "worked with", "pierre curie"),
                               ("marie curie", RELATED_TO, "paris")]
    assert parse_graph("```json\n" + json.dumps(GOOD) + "\n```", CURIE) == graph  # code fences are tolerated
    assert parse_graph('{"entities": [], "relations": []}', CURIE) == ChunkGraph()


@pytest.mark.parametrize("answer", [
    "", "Marie Curie is a person.", "{not json}", "[1, 2]", '{"entities": {}, "relations": []}',
    '{"entities": []}', '{"relations": []}', '{"entities": [], "relations": "none"}', "{" * 100_000 + "}" * 100_000,
])
def test_garbage_is_rejected_as_a_whole(answer: str) -> None:
    with pytest.raises(BadExtraction):
        parse_graph(answer, CURIE)


def test_invalid_items_are_dropped_and_bounds_hold() -> None:
    answer = {"entities": [{"name": "Marie Curie"}, {"name": 7, "type": "x"}, {"name": "", "type": "x"},
                           {"name": "Paris", "type": "x" * 65}, "Pierre Curie", {"name": "polonium", "type": "c"}],
              "relations": [["Marie Curie", "found", "polonium"], {"subject": "polonium", "predicate": 3,
                                                                   "object": "Paris"},
                            {"subject": "polonium", "predicate": "p" * 300, "object": "Paris"}]}
    graph = parse_graph(json.dumps(answer), CURIE)
    assert graph.entities == {"polonium": "polonium", "paris": "Paris"}
    assert graph.relations == [("polonium", "p" * MAX_PREDICATE_CHARS, "paris")]
    many = " ".join(f"w{i}" for i in range(600))
    crowd = parse_graph(json.dumps({"entities": [{"name": f"w{i}", "type": "t"} for i in range(600)],
                                    "relations": [{"subject": f"w{i}", "predicate": "r", "object": f"w{i + 1}"}
                                                  for i in range(599)]}), many)
    assert len(crowd.entities) == MAX_CHUNK_ENTITIES
    assert len(crowd.relations) == MAX_CHUNK_ENTITIES - 1  # both ends must be among the kept entities


def test_the_prompt_carries_the_chunk_and_asks_for_the_schema() -> None:
    system, user = extraction_messages(CURIE)
    assert "JSON" in system["content"] and user["content"].endswith(CURIE)
    assert '"entities"' in user["content"] and '"relations"' in user["content"]


def _chunk_of(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"]).rsplit("Text:\n", 1)[-1]


@dataclass
class GraphUpstream(FakeBackend):
    """Answers each extraction with `reply(chunk text)`; a chunk containing "slowly" never gets an
    answer, one containing "boom" gets HTTP 500. `seen`: every request's headers, model and temperature."""

    reply: Callable[[str], str] = lambda text: "{}"
    seen: list[dict[str, str]] = field(default_factory=list)

    def _words(self, model: str, body: dict[str, Any]) -> list[str]:
        return [self.reply(_chunk_of(body))]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append({**{k.lower(): v for k, v in request.headers.items()}, "model": body["model"],
                          "temperature": str(body["temperature"])})
        if "slowly" in _chunk_of(body):
            await self._hang()
            return web.json_response({"error": {"message": "released"}}, status=500)
        if "boom" in _chunk_of(body):
            return web.json_response({"error": {"message": "boom"}}, status=500)
        return await super()._chat(request)


def reply(text: str) -> str:
    if "fission" in text:
        return "Sure! The entities are Lise Meitner and Berlin."
    return json.dumps({"entities": [{"name": w, "type": "concept"} for w in ("polonium", "radium") if w in text]
                       + [{"name": "Marie Curie", "type": "person"}] * ("Marie Curie" in text),
                       "relations": [{"subject": "Marie Curie", "predicate": "discovered", "object": "polonium"}]})


@pytest.fixture
async def upstream() -> AsyncIterator[GraphUpstream]:
    server = GraphUpstream(hang_s=60, reply=reply)
    await server.start()
    yield server
    await server.stop()


TEXT = ("Marie Curie discovered polonium and radium. In Berlin, Lise Meitner explained nuclear fission. "
        "Later Otto Hahn slowly confirmed it. Then Niels Bohr said boom.")


def _spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for end in [i + 1 for i, c in enumerate(text) if c == "."]:
        spans.append((start, end))
        start = end + 1
    return spans


async def test_each_failure_falls_back_to_the_local_graph_of_that_chunk(upstream: GraphUpstream) -> None:
    client = ChatClient(upstream.base_url, api_key="svc-key", model="extractor", timeout_s=0.5, max_tokens=512)
    extractor = LlmExtractor(client, concurrency=2, document_timeout_s=60)
    spans = _spans(TEXT)
    try:
        with ctx.bind(request_id="req-7"):
            found = await extractor.chunk_graphs(TEXT, spans, tenant="tenant-a", purpose="graph_extract:3")
    finally:
        await client.close()
    fallback = chunk_graphs(TEXT, spans)
    assert found.graphs[0] == ChunkGraph(
        entities={"polonium": "polonium", "radium": "radium", "marie curie": "Marie Curie"},
        relations=[("marie curie", "discovered", "polonium")])
    assert found.graphs[0] != fallback[0]  # the local extractor knows nothing of polonium
    assert found.graphs[1:] == fallback[1:] and "lise meitner" in found.graphs[1].entities
    assert dict(found.fallbacks) == {"EXTRACTION_INVALID": 1, "GENERATOR_TIMEOUT": 1, "GENERATOR_FAILED": 1}
    assert found.fallback_chunks == 3
    # one call per chunk, charged to the tenant, each with its own request id
    assert sorted(h["x-request-id"] for h in upstream.seen) == [f"req-7:graph_extract:3:{i}" for i in range(4)]
    assert {(h["x-llmo-tenant"], h["authorization"], h["model"], h["temperature"]) for h in upstream.seen} == {
        ("tenant-a", "Bearer svc-key", "extractor", "0.0")}


async def test_the_document_budget_and_a_missing_generator_fall_back_too(upstream: GraphUpstream) -> None:
    text = "Otto Hahn slowly worked. Lise Meitner slowly wrote."
    spans = _spans(text)
    client = ChatClient(upstream.base_url, timeout_s=60)
    try:
        found = await LlmExtractor(client, document_timeout_s=0.3).chunk_graphs(text, spans, tenant="t", purpose="p")
    finally:
        await client.close()
    assert found.graphs == chunk_graphs(text, spans) and dict(found.fallbacks) == {"GENERATOR_TIMEOUT": 2}
    missing = await LlmExtractor(None).chunk_graphs(text, spans, tenant="t", purpose="p")
    assert missing.graphs == chunk_graphs(text, spans) and dict(missing.fallbacks) == {"GENERATOR_UNAVAILABLE": 2}
    assert await LlmExtractor(None).chunk_graphs("", [], tenant="t", purpose="p") == type(missing)([])
