"""Query understanding and compression: the generator client against a real HTTP server on a
socket (it stands in for a paid LLM API), parsing the generator's lines, the prompts, and
extractive compression with the real MiniLM model."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from llmo.core import context as ctx
from llmo.embedding import Embedder
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.retrieval import chunking, postprocess
from llmo.retrieval.generator import Generator, GeneratorError, chat_completions_url
from llmo.retrieval.query import expansion_messages, hyde_messages, parse_expansion, plan_query
from llmo.retrieval.search import StageLog
from llmo.retrieval.settings import RetrievalSettings
from llmo.router.fake_backend import FakeBackend


def test_the_generator_url_gets_v1_once() -> None:
    assert chat_completions_url("http://r:8080") == "http://r:8080/v1/chat/completions"
    assert chat_completions_url("http://r:8080/v1/") == "http://r:8080/v1/chat/completions"


def test_expansion_lines_lose_bullets_quotes_blanks_and_repeats() -> None:
    text = "1. Penguins flight ability\n\n- \"penguins flight ability\"\n* Can penguins fly?\n2) birds that cannot fly\n"
    standalone, paraphrases = parse_expansion(text, "can they fly?", with_history=True, wanted=3, max_chars=100)
    assert standalone == "Penguins flight ability"
    assert paraphrases == ["Can penguins fly?", "birds that cannot fly"]
    # without history every line is a paraphrase; the query itself is never searched twice
    standalone, paraphrases = parse_expansion("Can they fly?\nflying ability\nflying ability\nwings", "can they fly?",
                                              with_history=False, wanted=2, max_chars=8)
    assert (standalone, paraphrases) == ("can they fly?", ["flying a", "wings"])


def test_prompts_carry_the_history_and_only_the_history() -> None:
    history = [pb.ConversationTurn(role="user", content="Tell me about penguins"),
               pb.ConversationTurn(role="assistant", content="Penguins live in the south.")]
    expansion = expansion_messages("Can they fly?", history, 4)[-1]["content"]
    assert "user: Tell me about penguins\nassistant: Penguins live in the south." in expansion
    assert "Follow-up question: Can they fly?" in expansion and "write 4 different" in expansion.lower()
    assert "Conversation" not in expansion_messages("Can they fly?", [], 3)[-1]["content"]
    assert "Can they fly?" in hyde_messages("Can they fly?", history)[-1]["content"]


@pytest.fixture
async def backend() -> FakeBackend:
    server = await FakeBackend(tokens=3, hang_s=30).start()
    yield server  # type: ignore[misc]
    await server.stop()


async def test_the_generator_bills_the_searching_tenant_with_a_request_id_per_purpose(backend: FakeBackend) -> None:
    generator = Generator(backend.base_url, api_key="svc-key", model="auto", timeout_s=5)
    try:
        with ctx.bind(request_id="req-1"):
            got = await generator.complete([{"role": "user", "content": "two words"}], purpose="hyde",
                                           tenant="tenant-b", model="small", user="u7")
    finally:
        await generator.close()
    assert backend.request_ids[-1] == "req-1:hyde"
    assert got.text == "small-w0 small-w1 small-w2" and (got.input_tokens, got.output_tokens) == (2, 3)
    headers = backend.headers[-1]
    assert headers["authorization"] == "Bearer svc-key" and headers["x-llmo-tenant"] == "tenant-b"
    assert backend.requests[-1]["stream"] is False and backend.requests[-1]["user"] == "u7"


@pytest.mark.parametrize(("behaviour", "reason"), [("error", "GENERATOR_FAILED"), ("reject", "GENERATOR_FAILED"),
                                                    ("garbage", "GENERATOR_FAILED"), ("hang", "GENERATOR_TIMEOUT")])
async def test_every_generator_failure_has_a_stable_reason(backend: FakeBackend, behaviour: str, reason: str) -> None:
    backend.behaviours["m"] = behaviour
    generator = Generator(backend.base_url, timeout_s=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(GeneratorError) as raised:
            await generator.complete([{"role": "user", "content": "x"}], purpose="query_expansion", tenant="t", model="m")
    finally:
        await generator.close()
    assert raised.value.reason == reason
    assert time.monotonic() - started < 10  # a hang is cut by the deadline, not by the server


async def test_a_call_never_outlives_the_search_deadline(backend: FakeBackend) -> None:
    backend.behaviours["m"] = "hang"
    generator = Generator(backend.base_url, timeout_s=30)
    started = time.monotonic()
    try:
        with ctx.bind(timeout=0.8), pytest.raises(GeneratorError) as raised:
            await generator.complete([{"role": "user", "content": "x"}], purpose="hyde", tenant="t", model="m")
        with ctx.bind(timeout=0.1), pytest.raises(GeneratorError) as late:  # less than the margin: no call at all
            await generator.complete([{"role": "user", "content": "x"}], purpose="hyde", tenant="t", model="m")
    finally:
        await generator.close()
    assert raised.value.reason == late.value.reason == "GENERATOR_TIMEOUT"
    assert backend.calls["m"] == 1 and time.monotonic() - started < 10


async def test_an_unreachable_generator_fails_cleanly() -> None:
    generator = Generator("http://127.0.0.1:9", timeout_s=2)
    try:
        with pytest.raises(GeneratorError) as raised:
            await generator.complete([{"role": "user", "content": "x"}], purpose="hyde", tenant="t")
    finally:
        await generator.close()
    assert raised.value.reason == "GENERATOR_FAILED"


async def test_plan_falls_back_per_stage_and_keeps_what_worked(backend: FakeBackend) -> None:
    backend.behaviours["broken"] = "error"
    generator = Generator(backend.base_url, timeout_s=5)
    stages = StageLog()
    request = pb.SearchRequest(query="penguins", query_expansion=pb.QueryExpansionOptions(enabled=True, model="broken"),
                               hyde=pb.HydeOptions(enabled=True, model="small"))
    try:
        plan = await plan_query(request, generator, RetrievalSettings(), stages, tenant="t")
    finally:
        await generator.close()
    reports = {r.stage: r for r in stages.reports}
    assert reports["query_expansion"].fell_back and reports["query_expansion"].fallback_reason == "GENERATOR_FAILED"
    assert not reports["hyde"].fell_back
    assert [v.text for v in plan.variants] == ["penguins"] and plan.expanded_queries == []
    assert plan.variants[0].embed_texts == ["penguins", "small-w0 small-w1 small-w2"]
    assert plan.hypothetical_document == "small-w0 small-w1 small-w2" and plan.output_tokens == 3


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(max_seq_length=256)


TEXTS = [
    "Penguins are flightless birds. They live mostly in the southern hemisphere. Penguins swim with their wings.",
    "The stock market fell on Monday. Emperor penguins can dive deeper than 500 metres. Analysts were surprised.",
]


def test_compression_keeps_the_relevant_sentences_in_document_order(embedder: Embedder) -> None:
    query = embedder.encode(["can penguins fly or swim"])[0]
    result = postprocess.compress(query, TEXTS, 0, embedder.encode)
    assert result.sentences_kept == len([s for t in result.texts for s in chunking.sentences(t)])
    assert "Penguins are flightless birds." in result.texts[0] and "stock market" not in result.context
    first = result.texts[0]
    if "Penguins swim" in first:
        assert first.index("flightless") < first.index("Penguins swim")
    assert result.context == "\n\n".join(t for t in result.texts if t)


def test_compression_respects_the_token_budget(embedder: Embedder) -> None:
    query = embedder.encode(["can penguins fly"])[0]
    for budget in (1, 8, 12, 30):
        result = postprocess.compress(query, TEXTS, budget, embedder.encode)
        assert result.tokens <= budget and chunking.token_count(result.context) <= budget
    assert postprocess.compress(query, TEXTS, 1, embedder.encode).context == ""
    assert postprocess.compress(query, ["", "  "], 0, embedder.encode).texts == ["", ""]


def test_compression_is_deterministic(embedder: Embedder) -> None:
    query = embedder.encode(["deep diving"])[0]
    runs = {postprocess.compress(query, TEXTS, 20, embedder.encode).context for _ in range(3)}
    assert len(runs) == 1


def test_sentences_and_tokens() -> None:
    assert chunking.sentences("One. Two!  Three?\nFour") == ["One.", "Two!", "Three?", "Four"]
    assert chunking.token_count("penguins") >= 1 and chunking.token_count("") == 0
    assert isinstance(np.zeros(1), np.ndarray) and asyncio.iscoroutinefunction(plan_query)
