"""The metrics: what each score means, exactly (services/evaluation/README.md repeats these).

Every score is in [0, 1]. `Scorer.score` computes one metric on one `Case` and raises `MetricError`
(a stable reason) when it cannot: a run records the reason on the example and goes on.

- G-Eval (`g_eval:<rubric>`): the judge reads the criteria, the evaluation steps (the rubric's own,
  else generated once per rubric content by the judge and stored) and the case, and answers an
  integer on the rubric's scale. With `use_logprobs` and an endpoint that returns them, the raw
  score is the sum of s * p(s) over the integer score tokens s of the scale in the first answer
  token's top logprobs, renormalised; otherwise the mean of `samples` answers. Normalised as
  (raw - min) / (max - min). An answer with no integer is JUDGE_BAD_OUTPUT, one outside the scale
  JUDGE_SCORE_OUT_OF_RANGE.
- Faithfulness: the share of the output's claims supported by the contexts. With a judge: one judge
  call lists the claims and a verdict for each. Without one (or with `local_detector`): the claims
  are the output's sentences and the local detector judges each against the contexts.
  Hallucination = 1 - faithfulness, on the same claims.
- Answer relevancy: with a judge (RAGAS): the judge writes three questions the output answers; the
  score is the mean cosine similarity (MiniLM) of those questions to the input, floored at 0.
  Without: max(0, cosine(input, output)).
- Context relevancy: the mean over contexts of max(0, cosine(input, context)) (MiniLM).
- Context precision (RAGAS): average precision of the contexts in their order, a context being
  relevant when the detector finds it supports at least one sentence of the reference:
  sum_k precision@k * rel_k / (number of relevant contexts); 0 when none is relevant.
- Context recall (RAGAS): the share of the reference's sentences the detector finds supported by
  the contexts.
- Pairwise: the judge compares the output (as A) with the reference (as B) and again with the
  order swapped; each order gives 1 (output better), 0.5 (tie) or 0; the score is their mean, so
  position bias cancels.
- Exact match: output equals reference after SQuAD normalisation (lower case, no punctuation, no
  articles a/an/the, whitespace collapsed).
- Deterministic checks, 1 or 0: regex (searched), JSON schema (draft 2020-12), contains (every
  string), length (characters in [min, max]), latency (<= max ms), cost (<= max micro-USD).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import jsonschema
import numpy as np

from llmo.core.errors import invalid_argument
from llmo.embedding import Embedder
from llmo.evaluation.detector import Detector, split_sentences
from llmo.evaluation.judge import Judge, JudgeError
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb

MAX_METRICS = 16
MAX_TEXT = 64 * 1024
MAX_CONTEXTS = 32
MAX_PATTERN = 1000
MAX_SCHEMA = 64 * 1024
MAX_CONTAINS = 32
MAX_SCALE = 100
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
NAMES = {pb.METRIC_FAITHFULNESS: "faithfulness", pb.METRIC_HALLUCINATION: "hallucination",
         pb.METRIC_ANSWER_RELEVANCY: "answer_relevancy", pb.METRIC_CONTEXT_RELEVANCY: "context_relevancy",
         pb.METRIC_EXACT_MATCH: "exact_match", pb.METRIC_CONTEXT_PRECISION: "context_precision",
         pb.METRIC_CONTEXT_RECALL: "context_recall", pb.METRIC_PAIRWISE: "pairwise", pb.METRIC_REGEX: "regex",
         pb.METRIC_JSON_SCHEMA: "json_schema", pb.METRIC_CONTAINS: "contains", pb.METRIC_LENGTH: "length",
         pb.METRIC_LATENCY: "latency", pb.METRIC_COST: "cost"}
_RUBRIC_NAME = re.compile(r"^[a-z0-9_-]{1,64}$")
_CODES = {"MISSING_REFERENCE": grpc.StatusCode.INVALID_ARGUMENT, "MISSING_CONTEXTS": grpc.StatusCode.INVALID_ARGUMENT,
          "MISSING_INPUT": grpc.StatusCode.INVALID_ARGUMENT, "JUDGE_NOT_CONFIGURED": grpc.StatusCode.FAILED_PRECONDITION,
          "JUDGE_TIMEOUT": grpc.StatusCode.DEADLINE_EXCEEDED, "JUDGE_UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
          "JUDGE_REJECTED": grpc.StatusCode.FAILED_PRECONDITION, "JUDGE_MODEL_NOT_FOUND": grpc.StatusCode.NOT_FOUND,
          "RUBRIC_NOT_FOUND": grpc.StatusCode.NOT_FOUND, "BUDGET_EXCEEDED": grpc.StatusCode.RESOURCE_EXHAUSTED}
SYSTEM = "You are a careful, impartial evaluator of AI answers."
FAITHFULNESS_SYSTEM = ("You check an answer against its context.\nSplit the answer into its factual claims and, for "
                       "each, say whether the context supports it. Reply with JSON only: {\"claims\": [{\"claim\": ..., "
                       "\"verdict\": \"supported\" | \"unsupported\" | \"contradicted\", \"context\": <index of the "
                       "supporting context or -1>, \"explanation\": ...}]}")


class MetricError(Exception):
    """A metric that could not be computed on a case; `reason` is stable, `code` what Evaluate returns."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail
        self.code = _CODES.get(reason, grpc.StatusCode.INVALID_ARGUMENT)


@dataclass(frozen=True)
class Case:
    input: str
    output: str
    contexts: tuple[str, ...] = ()
    reference: str = ""
    latency_ms: float = 0.0
    cost_micros: int = 0


@dataclass
class Spent:
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0
    judge_calls: int = 0

    def add(self, other: Spent) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost_micros += other.cost_micros
        self.judge_calls += other.judge_calls


class StepStore(Protocol):
    async def get(self, tenant: str, rubric_hash: str) -> list[str] | None: ...

    async def put(self, tenant: str, rubric_hash: str, steps: list[str]) -> None: ...


def metric_name(spec: pb.MetricSpec, rubric_name: str = "") -> str:
    if spec.metric == pb.METRIC_G_EVAL:
        return f"g_eval:{rubric_name or spec.rubric.name or 'rubric'}"
    return NAMES[spec.metric]


def rubric_hash(rubric: pb.Rubric) -> str:
    """Identifies a rubric's content (what its generated steps depend on), whatever its name."""
    content = pb.Rubric(criteria=rubric.criteria, min_score=rubric.min_score, max_score=rubric.max_score,
                        levels=rubric.levels)
    return hashlib.sha256(content.SerializeToString(deterministic=True)).hexdigest()


def _check_rubric(rubric: pb.Rubric, field: str) -> None:
    if not rubric.criteria.strip():
        raise invalid_argument("INVALID_RUBRIC", f"{field}.criteria is required", field=f"{field}.criteria")
    if rubric.name and not _RUBRIC_NAME.match(rubric.name):
        raise invalid_argument("INVALID_RUBRIC", f"{field}.name must match [a-z0-9_-]{{1,64}}", field=f"{field}.name")
    if rubric.min_score >= rubric.max_score or rubric.max_score - rubric.min_score > MAX_SCALE:
        raise invalid_argument("INVALID_RUBRIC", f"{field} needs min_score < max_score, a range of at most {MAX_SCALE}",
                               field=f"{field}.max_score")


def validate_specs(specs: Sequence[pb.MetricSpec]) -> None:
    if len(specs) > MAX_METRICS:
        raise invalid_argument("TOO_MANY_METRICS", f"at most {MAX_METRICS} metrics", field="metrics")
    for i, spec in enumerate(specs):
        field = f"metrics[{i}]"
        if spec.metric not in NAMES and spec.metric != pb.METRIC_G_EVAL:
            raise invalid_argument("INVALID_METRIC", f"{field}.metric is unspecified or unknown", field=f"{field}.metric")
        if not (math.isfinite(spec.pass_threshold) and 0.0 <= spec.pass_threshold <= 1.0):
            raise invalid_argument("INVALID_THRESHOLD", f"{field}.pass_threshold must be in [0, 1]",
                                   field=f"{field}.pass_threshold")
        if spec.metric == pb.METRIC_G_EVAL:
            has_inline = spec.HasField("rubric")
            if has_inline == bool(spec.rubric_ref):
                raise invalid_argument("MISSING_RUBRIC", f"{field} needs a rubric or a rubric_ref (one of them)",
                                       field=f"{field}.rubric")
            if has_inline:
                _check_rubric(spec.rubric, f"{field}.rubric")
        _check_check(spec, field)


def _check_check(spec: pb.MetricSpec, field: str) -> None:
    check, where = spec.check, f"{field}.check"

    def bad(detail: str) -> None:
        raise invalid_argument("INVALID_CHECK", f"{where}: {detail}", field=where)

    if spec.metric == pb.METRIC_REGEX:
        if not check.pattern or len(check.pattern) > MAX_PATTERN:
            bad(f"pattern is required (at most {MAX_PATTERN} characters)")
        try:
            re.compile(check.pattern)
        except re.error as error:
            bad(f"pattern does not compile: {error}")
    elif spec.metric == pb.METRIC_JSON_SCHEMA:
        if not check.json_schema or len(check.json_schema) > MAX_SCHEMA:
            bad(f"json_schema is required (at most {MAX_SCHEMA} bytes)")
        try:
            jsonschema.Draft202012Validator.check_schema(json.loads(check.json_schema))
        except (ValueError, jsonschema.SchemaError) as error:
            bad(f"json_schema is not a valid JSON Schema: {str(error)[:200]}")
    elif spec.metric == pb.METRIC_CONTAINS:
        if not check.contains or len(check.contains) > MAX_CONTAINS or not all(check.contains):
            bad(f"contains needs 1..{MAX_CONTAINS} non-empty strings")
    elif spec.metric == pb.METRIC_LENGTH:
        if check.min_chars < 0 or check.max_chars < 0 or (check.max_chars and check.max_chars < check.min_chars):
            bad("needs 0 <= min_chars <= max_chars (max 0: unbounded)")
        if not check.min_chars and not check.max_chars:
            bad("set min_chars or max_chars")
    elif spec.metric == pb.METRIC_LATENCY:
        if not (math.isfinite(check.max_latency_ms) and check.max_latency_ms > 0):
            bad("max_latency_ms must be > 0")
    elif spec.metric == pb.METRIC_COST and check.max_cost_micros <= 0:
        bad("max_cost_micros must be > 0")


def validate_case(case: Case, specs: Sequence[pb.MetricSpec]) -> None:
    for name in ("input", "output", "reference"):
        if len(getattr(case, name)) > MAX_TEXT:
            raise invalid_argument("FIELD_TOO_LONG", f"{name} is longer than {MAX_TEXT} characters", field=name)
    if len(case.contexts) > MAX_CONTEXTS or any(len(c) > MAX_TEXT for c in case.contexts):
        raise invalid_argument("FIELD_TOO_LONG", f"at most {MAX_CONTEXTS} contexts of {MAX_TEXT} characters each",
                               field="contexts")


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def _json_object(text: str) -> Any:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise ValueError("no JSON object")
    return json.loads(text[start:end + 1])


def _case_text(case: Case, *, with_contexts: bool = True) -> str:
    parts = [f"Input:\n{case.input}"]
    if with_contexts and case.contexts:
        parts.append("Context:\n" + "\n".join(f"[{i}] {c}" for i, c in enumerate(case.contexts)))
    if case.reference:
        parts.append(f"Reference answer:\n{case.reference}")
    parts.append(f"Answer to evaluate:\n{case.output}")
    return "\n\n".join(parts)


class Scorer:
    def __init__(self, *, embedder: Embedder, judge: Judge | None, judge_model_default: str = "auto",
                 detector_loader: Callable[[], Detector] | None = None) -> None:
        self.embedder, self.judge, self.judge_model_default = embedder, judge, judge_model_default
        self._load_detector = detector_loader or (lambda: Detector.load(embedder=embedder))
        self._detector: Detector | None = None
        self._detector_lock = asyncio.Lock()
        # One generation of evaluation steps per rubric content, however many judgements wait for it.
        self._step_locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def detector(self) -> Detector:
        async with self._detector_lock:
            if self._detector is None:
                self._detector = await asyncio.to_thread(self._load_detector)
        return self._detector

    # --- helpers ------------------------------------------------------------------------------

    def _need_judge(self) -> Judge:
        if self.judge is None:
            raise MetricError("JUDGE_NOT_CONFIGURED", "this metric needs a judge endpoint (LLMO_EVALUATION_JUDGE_URL)")
        return self.judge

    async def _ask(self, messages: list[dict[str, str]], judge_cfg: pb.JudgeConfig, spent: Spent, *, tenant: str,
                   purpose: str, repeat: int, samples: int = 1, logprobs: bool = False) -> tuple[list[str], Any, str]:
        judge = self._need_judge()
        try:
            answer = await judge.ask(messages, tenant=tenant, purpose=purpose, model=judge_cfg.model,
                                     temperature=judge_cfg.temperature, samples=samples, logprobs=logprobs,
                                     cache_salt=f"repeat:{repeat}")
        except JudgeError as error:
            raise MetricError(error.reason, error.detail) from error
        spent.add(Spent(answer.input_tokens, answer.output_tokens, answer.cost_micros, answer.calls))
        return answer.texts, answer.logprobs, answer.model

    async def _cosines(self, anchor: str, texts: Sequence[str]) -> np.ndarray:
        vectors = await asyncio.to_thread(self.embedder.encode, [anchor, *texts])
        vectors = np.asarray(vectors, dtype=np.float32)
        norms = np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
        return (vectors[1:] @ vectors[0]) / (norms[1:] * norms[0])

    # --- the metrics --------------------------------------------------------------------------

    async def score(self, case: Case, spec: pb.MetricSpec, judge_cfg: pb.JudgeConfig, *, tenant: str,
                    request_id: str = "", rubric: pb.Rubric | None = None, rubric_name: str = "",
                    rubric_version: str = "", repeat: int = 0, step_store: StepStore | None = None
                    ) -> tuple[pb.MetricResult, Spent]:
        spent = Spent()
        name = metric_name(spec, rubric_name)
        if not case.output.strip():
            raise MetricError("MISSING_OUTPUT", "there is no output to judge")
        metric = spec.metric
        if metric == pb.METRIC_G_EVAL:
            result = await self._g_eval(case, rubric or spec.rubric, judge_cfg, spent, tenant=tenant, repeat=repeat,
                                        step_store=step_store)
            result.rubric_version = rubric_version
        elif metric in (pb.METRIC_FAITHFULNESS, pb.METRIC_HALLUCINATION):
            result = await self._faithfulness(case, judge_cfg, spent, tenant=tenant, repeat=repeat)
            if metric == pb.METRIC_HALLUCINATION:
                result.score = result.raw_score = 1.0 - result.score
        elif metric == pb.METRIC_ANSWER_RELEVANCY:
            result = await self._answer_relevancy(case, judge_cfg, spent, tenant=tenant, repeat=repeat)
        elif metric == pb.METRIC_CONTEXT_RELEVANCY:
            self._need_contexts(case)
            if not case.input.strip():
                raise MetricError("MISSING_INPUT", "context relevancy needs the input")
            cosines = await self._cosines(case.input, case.contexts)
            result = pb.MetricResult(score=float(np.mean(np.maximum(cosines, 0.0))),
                                     judged_by=f"embedding:{EMBEDDING_MODEL}")
        elif metric in (pb.METRIC_CONTEXT_PRECISION, pb.METRIC_CONTEXT_RECALL):
            result = await self._context_reference(case, metric)
        elif metric == pb.METRIC_PAIRWISE:
            first, second, used = await self.pairwise_orders(case, judge_cfg, tenant=tenant, request_id=request_id,
                                                             repeat=repeat)
            spent.add(used)
            agree = "the two orders agreed" if first == second else "the orders disagreed (position bias)"
            result = pb.MetricResult(score=(first + second) / 2, reasoning=f"output first: {first}, output second: "
                                     f"{second}; {agree}", judged_by=f"judge:{judge_cfg.model or self.judge_model_default}")
        else:
            result = self._deterministic(case, spec)
        result.metric = name
        if metric != pb.METRIC_G_EVAL and metric not in (pb.METRIC_HALLUCINATION,):
            result.raw_score = result.score
        result.score = min(1.0, max(0.0, result.score))
        if spec.pass_threshold:
            result.passed = result.score <= spec.pass_threshold if metric == pb.METRIC_HALLUCINATION \
                else result.score >= spec.pass_threshold
        result.judge_calls = spent.judge_calls
        return result, spent

    @staticmethod
    def _need_contexts(case: Case) -> None:
        if not case.contexts or not any(c.strip() for c in case.contexts):
            raise MetricError("MISSING_CONTEXTS", "this metric needs the contexts the output should be grounded in")

    async def _steps(self, rubric: pb.Rubric, judge_cfg: pb.JudgeConfig, spent: Spent, *, tenant: str,
                     step_store: StepStore | None) -> list[str]:
        if rubric.evaluation_steps:
            return list(rubric.evaluation_steps)
        key = rubric_hash(rubric)
        lock = self._step_locks.setdefault((tenant, key), asyncio.Lock())
        async with lock:
            return await self._stored_or_new_steps(rubric, key, judge_cfg, spent, tenant=tenant,
                                                   step_store=step_store)

    async def _stored_or_new_steps(self, rubric: pb.Rubric, key: str, judge_cfg: pb.JudgeConfig, spent: Spent, *,
                                   tenant: str, step_store: StepStore | None) -> list[str]:
        if step_store is not None:
            stored = await step_store.get(tenant, key)
            if stored:
                return stored
        prompt = (f"Criteria: {rubric.criteria}\nScores run from {rubric.min_score} to {rubric.max_score}.\n"
                  "Write the evaluation steps a grader should follow to apply these criteria, one numbered step per "
                  "line, at most 6 steps.")
        texts, _, _ = await self._ask([{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                                      pb.JudgeConfig(model=judge_cfg.model), spent, tenant=tenant,
                                      purpose="g_eval_steps", repeat=0)
        steps = [re.sub(r"^\s*(\d+[.)]|[-*])\s*", "", line).strip() for line in texts[0].splitlines()]
        steps = [s for s in steps if s][:20]
        if not steps:
            raise MetricError("JUDGE_BAD_OUTPUT", "the judge wrote no evaluation steps")
        if step_store is not None:
            await step_store.put(tenant, key, steps)
        return steps

    async def _g_eval(self, case: Case, rubric: pb.Rubric, judge_cfg: pb.JudgeConfig, spent: Spent, *, tenant: str,
                      repeat: int, step_store: StepStore | None) -> pb.MetricResult:
        steps = await self._steps(rubric, judge_cfg, spent, tenant=tenant, step_store=step_store)
        low, high = rubric.min_score, rubric.max_score
        levels = "".join(f"\n{level.score}: {level.description}" for level in rubric.levels)
        prompt = (f"Criteria: {rubric.criteria}\n\nEvaluation steps:\n" + "\n".join(
            f"{i}. {s}" for i, s in enumerate(steps, 1)) + (f"\n\nScore levels:{levels}" if levels else "") +
            f"\n\n{_case_text(case)}\n\nScore: answer with the score only, an integer from {low} to {high}.")
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        samples = max(1, judge_cfg.samples)
        use_logprobs = judge_cfg.use_logprobs and self._need_judge().logprobs_supported
        texts, logprobs, model = await self._ask(messages, judge_cfg, spent, tenant=tenant, purpose="g_eval",
                                                 repeat=repeat, samples=1 if use_logprobs else samples,
                                                 logprobs=use_logprobs)
        weighted = _weighted_score(logprobs[0] if logprobs else None, low, high) if use_logprobs else None
        if weighted is None and use_logprobs and samples > 1:  # no usable logprobs: sample instead
            texts, _, model = await self._ask(messages, judge_cfg, spent, tenant=tenant, purpose="g_eval",
                                              repeat=repeat, samples=samples)
        if weighted is not None:
            raw, stddev = weighted
        else:
            values = [_parse_score(t, low, high) for t in texts]
            raw, stddev = float(np.mean(values)), float(np.std(values))
        return pb.MetricResult(score=(raw - low) / (high - low), raw_score=raw, score_stddev=stddev / (high - low),
                               evaluation_steps=steps, reasoning=texts[0][:500],
                               judged_by=f"judge:{model or judge_cfg.model or self.judge_model_default}")

    async def _faithfulness(self, case: Case, judge_cfg: pb.JudgeConfig, spent: Spent, *, tenant: str,
                            repeat: int) -> pb.MetricResult:
        self._need_contexts(case)
        if self.judge is not None and not judge_cfg.local_detector:
            texts, _, model = await self._ask(
                [{"role": "system", "content": FAITHFULNESS_SYSTEM}, {"role": "user", "content": _case_text(case)}],
                judge_cfg, spent, tenant=tenant, purpose="faithfulness", repeat=repeat)
            try:
                claims = _json_object(texts[0])["claims"]
                verdicts = [pb.ClaimVerdict(claim=str(c["claim"]), supported=str(c["verdict"]).lower() == "supported",
                                            context_index=_context_index(c.get("context"), len(case.contexts)),
                                            explanation=str(c.get("explanation", ""))) for c in claims]
            except (ValueError, KeyError, TypeError) as error:
                raise MetricError("JUDGE_BAD_OUTPUT", f"the judge's claims are not the JSON asked for: {error!r}"
                                  ) from error
            judged_by = f"judge:{model or judge_cfg.model or self.judge_model_default}"
        else:
            detector = await self.detector()
            claims_text = [s.text for s in split_sentences(case.output)] or [case.output.strip()]
            joined = "\n".join(case.contexts)
            result = await asyncio.to_thread(detector.faithfulness, joined, claims_text)
            verdicts = []
            for claim, verdict in zip(claims_text, result.verdicts, strict=True):
                evidence = verdict.supporting_sentences[0].text if verdict.supporting_sentences else ""
                index = next((i for i, c in enumerate(case.contexts) if evidence and evidence in c), -1)
                verdicts.append(pb.ClaimVerdict(claim=claim, supported=verdict.supported,
                                                context_index=index if verdict.supported else -1,
                                                explanation=f"{verdict.label} ({verdict.probabilities[verdict.label]:.2f})"))
            judged_by = f"detector:{detector.version}"
        supported = sum(v.supported for v in verdicts)
        score = supported / len(verdicts) if verdicts else 1.0
        return pb.MetricResult(score=score, claims=verdicts, judged_by=judged_by,
                               reasoning=f"{supported} of {len(verdicts)} claims supported" if verdicts
                               else "the answer makes no claims")

    async def _answer_relevancy(self, case: Case, judge_cfg: pb.JudgeConfig, spent: Spent, *, tenant: str,
                                repeat: int) -> pb.MetricResult:
        if not case.input.strip():
            raise MetricError("MISSING_INPUT", "answer relevancy needs the input")
        if self.judge is not None and not judge_cfg.local_detector:
            texts, _, model = await self._ask([{"role": "system", "content": SYSTEM}, {"role": "user", "content": (
                f"Answer:\n{case.output}\n\nWrite three different questions this answer answers, one per line, "
                "nothing else.")}], judge_cfg, spent, tenant=tenant, purpose="answer_relevancy", repeat=repeat)
            questions = [re.sub(r"^\s*(\d+[.)]|[-*])\s*", "", q).strip() for q in texts[0].splitlines()]
            questions = [q for q in questions if q][:3]
            if not questions:
                raise MetricError("JUDGE_BAD_OUTPUT", "the judge wrote no questions")
            cosines = await self._cosines(case.input, questions)
            return pb.MetricResult(score=float(np.mean(np.maximum(cosines, 0.0))), reasoning="; ".join(questions),
                                   judged_by=f"judge:{model or judge_cfg.model or self.judge_model_default}")
        cosine = (await self._cosines(case.input, [case.output]))[0]
        return pb.MetricResult(score=float(max(0.0, cosine)), judged_by=f"embedding:{EMBEDDING_MODEL}")

    async def _context_reference(self, case: Case, metric: int) -> pb.MetricResult:
        self._need_contexts(case)
        if not case.reference.strip():
            raise MetricError("MISSING_REFERENCE", "this metric needs a reference answer")
        detector = await self.detector()
        sentences = [s.text for s in split_sentences(case.reference)] or [case.reference.strip()]
        if metric == pb.METRIC_CONTEXT_RECALL:
            result = await asyncio.to_thread(detector.faithfulness, "\n".join(case.contexts), sentences)
            return pb.MetricResult(score=result.score, judged_by=f"detector:{detector.version}",
                                   reasoning=f"{round(result.score * len(sentences))} of {len(sentences)} reference "
                                   "sentences supported")
        pairs = [(context, sentence) for context in case.contexts for sentence in sentences]
        verdicts = await asyncio.to_thread(detector.judge_many, pairs)
        relevant = [any(v.supported for v in verdicts[k * len(sentences):(k + 1) * len(sentences)])
                    for k in range(len(case.contexts))]
        hits, precision_sum = 0, 0.0
        for k, rel in enumerate(relevant, 1):
            if rel:
                hits += 1
                precision_sum += hits / k
        return pb.MetricResult(score=precision_sum / hits if hits else 0.0, judged_by=f"detector:{detector.version}",
                               reasoning=f"relevant contexts: {[i for i, r in enumerate(relevant) if r]}")

    async def pairwise_orders(self, case: Case, judge_cfg: pb.JudgeConfig, *, tenant: str, request_id: str = "",
                              repeat: int = 0) -> tuple[float, float, Spent]:
        """The output's preference with it shown first (as A) and second (as B): 1, 0.5 or 0 each."""
        if not case.reference.strip():
            raise MetricError("MISSING_REFERENCE", "pairwise needs a reference answer to compare with")
        spent = Spent()

        async def order(first: str, second: str, purpose: str) -> str:
            prompt = (f"Question:\n{case.input}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\nWhich answer is "
                      "better? Reply with A, B or TIE only.")
            texts, _, _ = await self._ask([{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                                          judge_cfg, spent, tenant=tenant, purpose=purpose, repeat=repeat)
            # The first word decides ("A", "Answer B.", "**TIE**"); "Both are fine" is not a B.
            words = re.findall(r"[A-Z]+", texts[0].upper())
            if words[:1] == ["ANSWER"]:
                words = words[1:]
            if words and words[0] in ("A", "B", "TIE"):
                return words[0]
            raise MetricError("JUDGE_BAD_OUTPUT", f"expected A, B or TIE; got {texts[0][:50]!r}")

        one, two = await asyncio.gather(order(case.output, case.reference, "pairwise_ab"),
                                        order(case.reference, case.output, "pairwise_ba"))
        first = {"A": 1.0, "TIE": 0.5, "B": 0.0}[one]
        second = {"B": 1.0, "TIE": 0.5, "A": 0.0}[two]
        return first, second, spent

    @staticmethod
    def _deterministic(case: Case, spec: pb.MetricSpec) -> pb.MetricResult:
        check, metric, out = spec.check, spec.metric, case.output

        def verdict(ok: bool, why: str) -> pb.MetricResult:
            return pb.MetricResult(score=1.0 if ok else 0.0, reasoning=why, judged_by="deterministic")

        if metric == pb.METRIC_EXACT_MATCH:
            if not case.reference.strip():
                raise MetricError("MISSING_REFERENCE", "exact match needs a reference answer")
            ok = normalize_answer(out) == normalize_answer(case.reference)
            return verdict(ok, "equal after normalisation" if ok else "differs from the reference")
        if metric == pb.METRIC_REGEX:
            ok = re.search(check.pattern, out, re.IGNORECASE if check.ignore_case else 0) is not None
            return verdict(ok, "pattern found" if ok else "pattern not found")
        if metric == pb.METRIC_JSON_SCHEMA:
            try:
                jsonschema.validate(json.loads(out), json.loads(check.json_schema),
                                    cls=jsonschema.Draft202012Validator)
                return verdict(True, "valid JSON matching the schema")
            except ValueError as error:
                return verdict(False, f"not JSON: {str(error)[:200]}")
            except jsonschema.ValidationError as error:
                return verdict(False, f"does not match the schema: {error.message[:200]}")
        if metric == pb.METRIC_CONTAINS:
            haystack = out.lower() if check.ignore_case else out
            missing = [s for s in check.contains if (s.lower() if check.ignore_case else s) not in haystack]
            return verdict(not missing, f"missing {missing}" if missing else "contains every string")
        if metric == pb.METRIC_LENGTH:
            ok = len(out) >= check.min_chars and (not check.max_chars or len(out) <= check.max_chars)
            return verdict(ok, f"{len(out)} characters")
        if metric == pb.METRIC_LATENCY:
            return verdict(case.latency_ms <= check.max_latency_ms, f"{case.latency_ms:.1f} ms")
        return verdict(case.cost_micros <= check.max_cost_micros, f"{case.cost_micros} micro-USD")


def _context_index(value: Any, contexts: int) -> int:
    """The judge's context index when it names one of the contexts, else -1."""
    text = str(value).strip()
    index = int(text) if text.isdigit() else -1
    return index if index < contexts else -1


def _parse_score(text: str, low: int, high: int) -> float:
    match = re.search(r"-?\d+(?:\.\d+)?", text)
    if match is None:
        raise MetricError("JUDGE_BAD_OUTPUT", f"no score in the judge's answer {text[:80]!r}")
    value = float(match.group())
    if not low <= value <= high:
        raise MetricError("JUDGE_SCORE_OUT_OF_RANGE", f"score {value:g} is outside {low}..{high}")
    return value


def _weighted_score(tokens: Sequence[Any] | None, low: int, high: int) -> tuple[float, float] | None:
    """sum s * p(s) over the integer score tokens of the first answer token, renormalised; with the
    standard deviation of that distribution. None when no score token is among the top logprobs."""
    if not tokens:
        return None
    first = tokens[0]
    candidates = list(first.top) or [(first.token, first.logprob)]
    weights: dict[int, float] = {}
    for token, logprob in candidates:
        word = token.strip()
        if word.lstrip("-").isdigit() and low <= int(word) <= high:
            weights[int(word)] = weights.get(int(word), 0.0) + math.exp(logprob)
    total = sum(weights.values())
    if total <= 0:
        return None
    mean = sum(s * p for s, p in weights.items()) / total
    var = sum(p * (s - mean) ** 2 for s, p in weights.items()) / total
    return mean, math.sqrt(var)
