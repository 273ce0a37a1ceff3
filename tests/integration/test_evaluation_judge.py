"""The judge client and the judged metrics against a scripted OpenAI-compatible judge served by aiohttp
on 127.0.0.1 (it stands in for a paid LLM API): logprob-weighted and sampled G-Eval, the fallbacks
when an endpoint refuses logprobs or ignores `n`, retries, timeouts, bad answers, the cache, the
concurrency limit, the headers that bill the right tenant, one call per faithfulness judgement and
pairwise judgements in both orders."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from aiohttp import web

from llmo.chat_client import ChatClient, ChatError
from llmo.core import context as ctx
from llmo.embedding import Embedder
from llmo.evaluation.evaluate import StoredSteps
from llmo.evaluation.judge import Judge
from llmo.evaluation.scoring import FAITHFULNESS_SYSTEM, Case, MetricError, Scorer, Spent, rubric_hash
from llmo.evaluation.storage import EvaluationStore
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb

Reply = dict[str, Any] | tuple[int, Any] | None  # a completion body, (HTTP status, error body or text), None: hang
Script = Callable[[dict[str, Any], int], Reply]  # (request body, index of the request) -> reply

STEPS = ["Read the answer.", "Compare it with the criteria.", "Decide a score."]
RUBRIC = pb.Rubric(name="helpfulness", criteria="Does the answer help the user?", evaluation_steps=STEPS,
                   min_score=1, max_score=5)
G_EVAL = pb.MetricSpec(metric=pb.METRIC_G_EVAL, rubric=RUBRIC)
CASE = Case(input="What is the capital of France?", output="Paris.", contexts=("Paris is the capital of France.",),
            reference="The capital of France is Paris.")
LOGPROBS_REFUSED = (400, {"error": {"message": "logprobs is not supported by the router", "type": "invalid_request_error",
                                    "code": "UNSUPPORTED_PARAMETER", "param": "logprobs"}})


def completion(*texts: str, logprobs: list[dict[str, Any]] | None = None, cost_micros: int = 0) -> dict[str, Any]:
    choices: list[dict[str, Any]] = [{"index": i, "message": {"role": "assistant", "content": t},
                                      "finish_reason": "stop"} for i, t in enumerate(texts)]
    if logprobs is not None:
        choices[0]["logprobs"] = {"content": logprobs}
    body: dict[str, Any] = {"id": "x", "object": "chat.completion", "model": "judge-1", "choices": choices,
                            "usage": {"prompt_tokens": 100, "completion_tokens": 3, "total_tokens": 103}}
    if cost_micros:
        body["llmo"] = {"cost_micros": cost_micros}
    return body


def first_token(token: str, top: dict[str, float]) -> list[dict[str, Any]]:
    """Logprobs of an answer's first token with its top alternatives given as probabilities."""
    return [{"token": token, "logprob": math.log(top[token]),
             "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in top.items()]}]


def prompt_of(body: dict[str, Any]) -> str:
    return "\n".join(str(m["content"]) for m in body["messages"])


@dataclass
class FakeJudge:
    script: Script
    delay_s: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        index = len(self.requests)
        self.requests.append(body)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            reply = self.script(body, index)
            if reply is None:
                await self.release.wait()
                return web.json_response(completion("3"))
            if isinstance(reply, tuple):
                status, payload = reply
                if isinstance(payload, str):
                    return web.Response(status=status, text=payload)
                return web.json_response(payload, status=status)
            return web.json_response(reply)
        finally:
            self.in_flight -= 1


@dataclass
class Setup:
    fake: FakeJudge
    judge: Judge
    scorer: Scorer

    async def score(self, spec: pb.MetricSpec, case: Case = CASE, judge: pb.JudgeConfig | None = None, *,
                    tenant: str = "tenantA", repeat: int = 0, step_store: StoredSteps | None = None
                    ) -> tuple[pb.MetricResult, Spent]:
        return await self.scorer.score(case, spec, judge or pb.JudgeConfig(), tenant=tenant, repeat=repeat,
                                       rubric_version="rubrics/helpfulness@1", step_store=step_store)

    async def failure(self, spec: pb.MetricSpec, case: Case = CASE, judge: pb.JudgeConfig | None = None) -> MetricError:
        with pytest.raises(MetricError) as raised:
            await self.score(spec, case, judge)
        return raised.value


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(max_seq_length=256)


@asynccontextmanager
async def judging(script: Script, embedder: Embedder, *, delay_s: float = 0.0, timeout_s: float = 5.0,
                  retries: int = 2, concurrency: int = 8, cache_entries: int = 1000) -> AsyncIterator[Setup]:
    fake = FakeJudge(script, delay_s)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = ChatClient(f"http://127.0.0.1:{port}", api_key="service-key", model="judge-default",
                        timeout_s=timeout_s, max_tokens=256)
    judge = Judge(client, retries=retries, concurrency=concurrency, cache_entries=cache_entries)
    try:
        yield Setup(fake, judge, Scorer(embedder=embedder, judge=judge, judge_model_default="judge-default"))
    finally:
        fake.release.set()
        await client.close()
        await runner.cleanup()


def constant(reply: Reply) -> Script:
    return lambda body, index: reply


# --- G-Eval -------------------------------------------------------------------------------------


async def test_g_eval_weights_the_score_tokens_by_their_probabilities(embedder: Embedder) -> None:
    # p(4) = .48, p(5) = .24, p(3) = .08; "The" and the off-scale "9" are left out and the rest renormalised.
    top = {"4": 0.48, "5": 0.24, "The": 0.12, "3": 0.08, "9": 0.08}
    async with judging(constant(completion("4", logprobs=first_token("4", top))), embedder) as s:
        result, spent = await s.score(G_EVAL, judge=pb.JudgeConfig(use_logprobs=True, samples=5))
    raw = (4 * 0.48 + 5 * 0.24 + 3 * 0.08) / 0.8
    assert result.metric == "g_eval:helpfulness"
    assert result.raw_score == pytest.approx(raw)
    assert result.score == pytest.approx((raw - 1) / 4)
    assert list(result.evaluation_steps) == STEPS
    assert (result.judged_by, result.rubric_version) == ("judge:judge-1", "rubrics/helpfulness@1")
    assert len(s.fake.requests) == 1 == result.judge_calls == spent.judge_calls  # one call, not `samples`
    body = s.fake.requests[0]
    assert body["logprobs"] is True and body["top_logprobs"] > 0
    prompt = prompt_of(body)
    assert RUBRIC.criteria in prompt and all(step in prompt for step in STEPS) and CASE.output in prompt


async def test_g_eval_falls_back_to_sampling_when_logprobs_are_refused_and_remembers(embedder: Embedder) -> None:
    answered = 0

    def script(body: dict[str, Any], index: int) -> Reply:
        nonlocal answered
        if body.get("logprobs"):
            return LOGPROBS_REFUSED
        answered += 1
        return completion("435"[(answered - 1) % 3])  # any three answers in a row are 3, 4 and 5

    async with judging(script, embedder) as s:
        result, spent = await s.score(G_EVAL, judge=pb.JudgeConfig(use_logprobs=True, samples=3))
        assert sum(1 for r in s.fake.requests if r.get("logprobs")) == 1
        assert len(s.fake.requests) == result.judge_calls == spent.judge_calls  # the refused call counts too
        before = len(s.fake.requests)
        second = Case(input="Name France's capital.", output="It is Paris.")
        again, _ = await s.score(G_EVAL, second, pb.JudgeConfig(use_logprobs=True, samples=3))
        later = s.fake.requests[before:]
    assert result.raw_score == pytest.approx(4.0)
    assert result.score == pytest.approx(0.75)
    assert result.score_stddev == pytest.approx(float(np.std([3, 4, 5])) / 4)
    assert len(later) == 3 and not any(r.get("logprobs") for r in later)  # logprobs are not asked for again
    assert again.raw_score == pytest.approx(4.0)


async def test_samples_are_separate_calls_when_the_endpoint_ignores_n(embedder: Embedder) -> None:
    answers = {0: "2", 1: "4", 2: "3"}
    async with judging(lambda body, index: completion(answers[index]), embedder) as s:
        with ctx.bind(request_id="req-9"):
            result, spent = await s.score(G_EVAL, judge=pb.JudgeConfig(samples=3))
    assert len(s.fake.requests) == 3 == result.judge_calls
    assert all(r.get("n", 1) == 1 for r in s.fake.requests)
    assert all(r["temperature"] > 0 for r in s.fake.requests)  # distinct samples, not one answer three times
    assert sorted(h["x-request-id"] for h in s.fake.headers) == [f"req-9:g_eval:{i}" for i in range(3)]
    assert result.raw_score == pytest.approx(3.0)
    assert result.score == pytest.approx(0.5)
    assert result.score_stddev == pytest.approx(float(np.std([2, 4, 3])) / 4)
    assert (spent.input_tokens, spent.output_tokens) == (300, 9)


async def test_garbage_and_out_of_scale_answers_fail_with_their_reasons(embedder: Embedder) -> None:
    async with judging(constant(completion("An excellent answer!")), embedder) as s:
        error = await s.failure(G_EVAL)
        assert (error.reason, error.code) == ("JUDGE_BAD_OUTPUT", grpc.StatusCode.INVALID_ARGUMENT)
    async with judging(constant((200, "<html>not json</html>")), embedder) as s:
        assert (await s.failure(G_EVAL)).reason == "JUDGE_BAD_OUTPUT"
    async with judging(constant({"choices": []}), embedder) as s:
        assert (await s.failure(G_EVAL)).reason == "JUDGE_BAD_OUTPUT"
    async with judging(constant(completion("7")), embedder) as s:
        error = await s.failure(G_EVAL)
        assert (error.reason, error.code) == ("JUDGE_SCORE_OUT_OF_RANGE", grpc.StatusCode.INVALID_ARGUMENT)
        assert len(s.fake.requests) == 1  # a bad answer is not retried


async def test_g_eval_steps_are_generated_once_per_rubric_content_and_stored(embedder: Embedder,
                                                                             tmp_path: Path) -> None:
    def script(body: dict[str, Any], index: int) -> Reply:
        if "Write the evaluation steps" in prompt_of(body):
            return completion("1. Check the facts.\n2. Check the tone.")
        return completion("5")

    bare = pb.Rubric(name="accuracy", criteria="Is the answer correct?", min_score=1, max_score=5)
    spec = pb.MetricSpec(metric=pb.METRIC_G_EVAL, rubric=bare)
    store = EvaluationStore.open(f"sqlite:///{tmp_path / 'evaluation.db'}")
    try:
        steps = StoredSteps(store)
        async with judging(script, embedder) as s:
            cases = [Case(input=f"question {i}", output=f"answer {i}") for i in range(4)]
            results = await asyncio.gather(*(s.scorer.score(c, spec, pb.JudgeConfig(), tenant="tenantA",
                                                            step_store=steps) for c in cases))
            asked_steps = [r for r in s.fake.requests if "Write the evaluation steps" in prompt_of(r)]
            assert len(asked_steps) == 1
            assert all(list(r.evaluation_steps) == ["Check the facts.", "Check the tone."] for r, _ in results)
            assert all(r.score == 1.0 for r, _ in results)
        assert await steps.get("tenantA", rubric_hash(bare)) == ["Check the facts.", "Check the tone."]
        async with judging(script, embedder) as restarted:  # a new process: its cache is empty, the store is not
            result, _ = await restarted.score(spec, step_store=steps)
            assert not any("Write the evaluation steps" in prompt_of(r) for r in restarted.fake.requests)
            assert list(result.evaluation_steps) == ["Check the facts.", "Check the tone."]
    finally:
        store.close()


# --- failures, retries, deadlines ---------------------------------------------------------------


async def test_timeouts_and_unavailable_judges_are_retried(embedder: Embedder) -> None:
    async with judging(lambda body, index: None if index == 0 else completion("4"), embedder, timeout_s=0.3) as s:
        result, _ = await s.score(G_EVAL)
        assert result.raw_score == 4.0
        assert len(s.fake.requests) == 2 == result.judge_calls
    for failure in ((503, {"error": {"message": "overloaded"}}), (429, {"error": {"message": "slow down"}})):
        async with judging(lambda body, index, f=failure: f if index == 0 else completion("4"), embedder) as s:
            result, _ = await s.score(G_EVAL)
            assert (result.raw_score, len(s.fake.requests)) == (4.0, 2)


async def test_a_judge_that_keeps_failing_gives_up_after_its_retries(embedder: Embedder) -> None:
    async with judging(constant(None), embedder, timeout_s=0.2, retries=2) as s:
        error = await s.failure(G_EVAL)
        assert (error.reason, error.code) == ("JUDGE_TIMEOUT", grpc.StatusCode.DEADLINE_EXCEEDED)
        assert len(s.fake.requests) == 3
    async with judging(constant((500, {"error": {"message": "boom"}})), embedder, retries=1) as s:
        error = await s.failure(G_EVAL)
        assert (error.reason, error.code) == ("JUDGE_UNAVAILABLE", grpc.StatusCode.UNAVAILABLE)
        assert "boom" in error.detail
        assert len(s.fake.requests) == 2


async def test_a_rejected_call_is_not_retried_and_says_why(embedder: Embedder) -> None:
    refused = (400, {"error": {"message": "max_tokens is too large", "code": "INVALID_REQUEST"}})
    async with judging(constant(refused), embedder) as s:
        error = await s.failure(G_EVAL)
    assert error.reason == "JUDGE_REJECTED" and "max_tokens is too large" in error.detail
    assert len(s.fake.requests) == 1


async def test_the_routers_budget_and_model_refusals_keep_their_meaning(embedder: Embedder) -> None:
    budget = (429, {"error": {"message": "budget denies this request", "code": "BUDGET_EXCEEDED"}})
    async with judging(constant(budget), embedder) as s:
        error = await s.failure(G_EVAL)
        assert (error.reason, error.code) == ("BUDGET_EXCEEDED", grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert len(s.fake.requests) == 1  # a denial is not an outage: no retry
    unknown = (400, {"error": {"message": "model 'nope' is not in the portfolio", "code": "UNKNOWN_MODEL"}})
    async with judging(constant(unknown), embedder) as s:
        error = await s.failure(G_EVAL, judge=pb.JudgeConfig(model="nope"))
        assert (error.reason, error.code) == ("JUDGE_MODEL_NOT_FOUND", grpc.StatusCode.NOT_FOUND)


async def test_no_call_is_made_past_the_callers_deadline(embedder: Embedder) -> None:
    async with judging(constant(completion("4")), embedder) as s:
        with ctx.bind(timeout=0.05):  # less than the margin kept back for the work after the call
            error = await s.failure(G_EVAL)
    assert error.reason == "JUDGE_TIMEOUT"
    assert s.fake.requests == []


async def test_chat_client_reports_the_server_error_code_and_the_routers_cost(embedder: Embedder) -> None:
    replies = iter([(404, {"error": {"message": "no such route", "code": "NOT_FOUND"}}),
                    completion("ok", cost_micros=1234)])
    async with judging(lambda body, index: next(replies), embedder) as s:
        with pytest.raises(ChatError) as raised:
            await s.judge.client.complete([{"role": "user", "content": "hi"}], tenant="t", purpose="p")
        assert (raised.value.reason, raised.value.status, raised.value.code) == ("REJECTED", 404, "NOT_FOUND")
        done = await s.judge.client.complete([{"role": "user", "content": "hi"}], tenant="t", purpose="p",
                                             response_format={"type": "json_object"})
    assert (done.texts, done.model, done.cost_micros, done.input_tokens, done.output_tokens) == (
        ["ok"], "judge-1", 1234, 100, 3)
    assert s.fake.requests[1]["response_format"] == {"type": "json_object"}


# --- cache, concurrency, headers ------------------------------------------------------------------


async def test_identical_judgements_are_answered_from_the_cache(embedder: Embedder) -> None:
    async with judging(constant(completion("4", cost_micros=50)), embedder) as s:
        first, first_spent = await s.score(G_EVAL)
        second, second_spent = await s.score(G_EVAL)
        assert len(s.fake.requests) == 1
        assert (first.judge_calls, first_spent.cost_micros, first_spent.input_tokens) == (1, 50, 100)
        assert (second.judge_calls, second_spent) == (0, Spent())
        assert second.score == first.score
        await s.score(G_EVAL, repeat=1)  # a reliability repeat is a new judgement
        assert len(s.fake.requests) == 2
        await s.score(G_EVAL, tenant="tenantB")  # another tenant's judgement is its own (and billed to it)
        assert len(s.fake.requests) == 3
        await s.score(G_EVAL, judge=pb.JudgeConfig(model="judge-2"))
        assert len(s.fake.requests) == 4
    async with judging(constant(completion("4")), embedder, cache_entries=0) as s:
        await s.score(G_EVAL)
        await s.score(G_EVAL)
        assert len(s.fake.requests) == 2


async def test_the_concurrency_limit_holds_across_all_callers(embedder: Embedder) -> None:
    async with judging(constant(completion("4")), embedder, delay_s=0.05, concurrency=2) as s:
        cases = [Case(input=f"question {i}", output=f"answer {i}") for i in range(8)]
        await asyncio.gather(*(s.score(G_EVAL, case, tenant=f"tenant{i % 2}") for i, case in enumerate(cases)))
        assert len(s.fake.requests) == 8
        assert s.fake.max_in_flight == 2


async def test_calls_bill_the_tenant_served_under_the_services_key(embedder: Embedder) -> None:
    async with judging(constant(completion("4")), embedder) as s:
        with ctx.bind(tenant="tenantB", request_id="run/r1/e7"):
            await s.score(G_EVAL, tenant="tenantB", judge=pb.JudgeConfig(model="judge-2"))
    headers, body = s.fake.headers[0], s.fake.requests[0]
    assert headers["x-llmo-tenant"] == "tenantB"
    assert headers["x-request-id"] == "run/r1/e7:g_eval"
    assert headers["authorization"] == "Bearer service-key"
    assert body["model"] == "judge-2" and body["stream"] is False


# --- faithfulness, relevancy, pairwise ------------------------------------------------------------


def claims(*items: tuple[str, str, object]) -> dict[str, Any]:
    return completion(json.dumps({"claims": [{"claim": c, "verdict": v, "context": i, "explanation": f"{c}: {v}"}
                                             for c, v, i in items]}))


async def test_faithfulness_with_a_judge_is_one_call_per_example(embedder: Embedder) -> None:
    reply = claims(("Paris is the capital.", "supported", 1), ("It has 9 million people.", "unsupported", -1),
                   ("It is in Spain.", "contradicted", 0), ("It is old.", "supported", 7))
    contexts = ("France is in Europe.", "Paris is the capital of France.")
    async with judging(constant(reply), embedder) as s:
        for i in range(5):
            case = Case(input=f"Tell me about Paris ({i})", output="Paris is the capital...", contexts=contexts)
            result, spent = await s.score(pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS), case)
            assert result.judge_calls == 1 == spent.judge_calls
        assert len(s.fake.requests) == 5
        hallucination, _ = await s.score(pb.MetricSpec(metric=pb.METRIC_HALLUCINATION, pass_threshold=0.4), case)
    system = s.fake.requests[0]["messages"][0]
    assert system["role"] == "system" and system["content"] == FAITHFULNESS_SYSTEM
    assert system["content"].splitlines()[0] == "You check an answer against its context."
    assert contexts[1] in prompt_of(s.fake.requests[0])
    assert result.score == pytest.approx(0.5)
    assert result.judged_by == "judge:judge-1"
    assert [(c.supported, c.context_index) for c in result.claims] == [(True, 1), (False, -1), (False, 0), (True, -1)]
    assert result.claims[1].explanation == "It has 9 million people.: unsupported"
    assert hallucination.score == pytest.approx(0.5) and not hallucination.passed
    assert hallucination.judge_calls == 0  # the same judgement, from the cache


async def test_faithfulness_edge_cases_with_a_judge(embedder: Embedder) -> None:
    async with judging(constant(completion('{"claims": []}')), embedder) as s:
        result, _ = await s.score(pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS))
        assert result.score == 1.0 and result.reasoning
    async with judging(constant(completion("Everything is supported.")), embedder) as s:
        assert (await s.failure(pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS))).reason == "JUDGE_BAD_OUTPUT"
    async with judging(constant(completion('{"claims": [{"verdict": "supported"}]}')), embedder) as s:
        assert (await s.failure(pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS))).reason == "JUDGE_BAD_OUTPUT"
    async with judging(constant(completion("unused")), embedder) as s:  # local_detector: no judge call at all
        result, _ = await s.score(pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS),
                                  judge=pb.JudgeConfig(local_detector=True))
        assert result.judged_by.startswith("detector:") and result.judge_calls == 0
        assert s.fake.requests == []


async def test_answer_relevancy_with_a_judge_compares_its_questions_with_the_input(embedder: Embedder) -> None:
    questions = ["What is the capital of France?", "Which city is France's capital?", "What is the best football club?"]
    async with judging(constant(completion("\n".join(f"{i}. {q}" for i, q in enumerate(questions, 1)))), embedder) as s:
        result, _ = await s.score(pb.MetricSpec(metric=pb.METRIC_ANSWER_RELEVANCY))
    vectors = embedder.encode([CASE.input, *questions])
    expected = float(np.mean(np.maximum(vectors[1:] @ vectors[0], 0.0)))
    assert result.score == pytest.approx(expected, abs=1e-5)
    assert result.judge_calls == 1 and result.judged_by == "judge:judge-1"
    assert CASE.output in prompt_of(s.fake.requests[0])


def preferring(word: str | None) -> Script:
    """A pairwise judge: the answer that mentions `word`, else always the first shown (`None`)."""

    def script(body: dict[str, Any], index: int) -> Reply:
        prompt = prompt_of(body)
        if word is None:
            return completion("A")
        a = prompt.split("Answer A:", 1)[1].split("Answer B:", 1)[0]
        return completion("A" if word in a else "B")

    return script


async def test_pairwise_judges_both_orders_and_reports_position_bias(embedder: Embedder) -> None:
    case = Case(input="What is the capital of France?", output="Paris.", reference="Lyon.")
    spec = pb.MetricSpec(metric=pb.METRIC_PAIRWISE, pass_threshold=0.75)
    async with judging(preferring("Paris"), embedder) as s:
        result, spent = await s.score(spec, case)
        first, second, _ = await s.scorer.pairwise_orders(case, pb.JudgeConfig(), tenant="tenantA", repeat=1)
        orders = [prompt_of(r) for r in s.fake.requests[:2]]
    assert (result.score, result.passed, result.judge_calls, spent.judge_calls) == (1.0, True, 2, 2)
    assert "disagree" not in result.reasoning
    assert (first, second) == (1.0, 1.0)
    shown_first = sorted(p.split("Answer A:", 1)[1].split("Answer B:", 1)[0].strip() for p in orders)
    assert shown_first == ["Lyon.", "Paris."]  # the output as A once and as B once
    async with judging(preferring(None), embedder) as s:  # a judge that always picks the first answer
        result, _ = await s.score(spec, case)
        first, second, _ = await s.scorer.pairwise_orders(case, pb.JudgeConfig(), tenant="tenantA", repeat=1)
    assert result.score == 0.5 and not result.passed
    assert "position bias" in result.reasoning
    assert (first, second) == (1.0, 0.0)


async def test_pairwise_needs_a_reference_and_a_clear_verdict(embedder: Embedder) -> None:
    async with judging(constant(completion("Both are fine, I think.")), embedder) as s:
        assert (await s.failure(pb.MetricSpec(metric=pb.METRIC_PAIRWISE))).reason == "JUDGE_BAD_OUTPUT"
        no_reference = Case(input="q", output="a")
        assert (await s.failure(pb.MetricSpec(metric=pb.METRIC_PAIRWISE), no_reference)).reason == "MISSING_REFERENCE"
    for verdict in ("TIE", "**Answer B**"):  # a tie, or the second answer in both orders: 0.5 either way
        async with judging(constant(completion(verdict)), embedder) as s:
            result, _ = await s.score(pb.MetricSpec(metric=pb.METRIC_PAIRWISE))
            assert result.score == 0.5
