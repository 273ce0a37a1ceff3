"""The metric definitions of `llmo.evaluation.scoring` on the real detector and MiniLM (no judge), and
the validation of metric specs and cases. Judged metrics are covered against a fake judge in
tests/integration/test_evaluation_judge.py."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from llmo.core.errors import ServiceError
from llmo.embedding import Embedder
from llmo.evaluation.detector import Detector
from llmo.evaluation.scoring import (
    Case,
    MetricError,
    Scorer,
    Spent,
    metric_name,
    normalize_answer,
    rubric_hash,
    validate_case,
    validate_specs,
)
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb

ASPIRIN = "Daily aspirin reduces the risk of a first heart attack in adults over fifty."
TRIAL = f"The trial enrolled 12,000 volunteers in four countries. {ASPIRIN} Bleeding events were rare and mostly minor."
FOOTBALL = ("The football club signed a new goalkeeper before the winter transfer window closed. "
            "Ticket prices for the season stayed the same.")
PARIS = "Paris is the capital of France. The city lies on the river Seine."
LOCAL = pb.JudgeConfig()
RUBRIC = pb.Rubric(name="helpfulness", criteria="Does the answer help the user?", min_score=1, max_score=5)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(max_seq_length=256)


@pytest.fixture(scope="module")
def scorer(embedder: Embedder) -> Scorer:
    return Scorer(embedder=embedder, judge=None, judge_model_default="auto")


def score(scorer: Scorer, case: Case, spec: pb.MetricSpec) -> tuple[pb.MetricResult, Spent]:
    return asyncio.run(scorer.score(case, spec, LOCAL, tenant="tenantA"))


def metric_error(scorer: Scorer, case: Case, spec: pb.MetricSpec) -> MetricError:
    with pytest.raises(MetricError) as raised:
        score(scorer, case, spec)
    return raised.value


def invalid(specs: list[pb.MetricSpec]) -> ServiceError:
    with pytest.raises(ServiceError) as raised:
        validate_specs(specs)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return raised.value


# --- names, rubric hashes -------------------------------------------------------------------------


def test_every_metric_has_its_documented_name() -> None:
    expected = {pb.METRIC_FAITHFULNESS: "faithfulness", pb.METRIC_HALLUCINATION: "hallucination",
                pb.METRIC_ANSWER_RELEVANCY: "answer_relevancy", pb.METRIC_CONTEXT_RELEVANCY: "context_relevancy",
                pb.METRIC_CONTEXT_PRECISION: "context_precision", pb.METRIC_CONTEXT_RECALL: "context_recall",
                pb.METRIC_EXACT_MATCH: "exact_match", pb.METRIC_PAIRWISE: "pairwise", pb.METRIC_REGEX: "regex",
                pb.METRIC_JSON_SCHEMA: "json_schema", pb.METRIC_CONTAINS: "contains", pb.METRIC_LENGTH: "length",
                pb.METRIC_LATENCY: "latency", pb.METRIC_COST: "cost"}
    for metric, name in expected.items():
        assert metric_name(pb.MetricSpec(metric=metric)) == name
    g_eval = pb.MetricSpec(metric=pb.METRIC_G_EVAL, rubric=RUBRIC)
    assert metric_name(g_eval) == "g_eval:helpfulness"
    assert metric_name(pb.MetricSpec(metric=pb.METRIC_G_EVAL, rubric_ref="rubrics/tone"), "tone") == "g_eval:tone"


def test_the_rubric_hash_follows_the_content_not_the_name() -> None:
    renamed = pb.Rubric()
    renamed.CopyFrom(RUBRIC)
    renamed.name = "other"
    assert rubric_hash(renamed) == rubric_hash(RUBRIC)
    stricter = pb.Rubric()
    stricter.CopyFrom(RUBRIC)
    stricter.criteria = "Is the answer correct?"
    assert rubric_hash(stricter) != rubric_hash(RUBRIC)
    wider = pb.Rubric()
    wider.CopyFrom(RUBRIC)
    wider.max_score = 10
    assert rubric_hash(wider) != rubric_hash(RUBRIC)


# --- validation ---------------------------------------------------------------------------------


def test_valid_specs_pass_validation() -> None:
    validate_specs([pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS, pass_threshold=0.8),
                    pb.MetricSpec(metric=pb.METRIC_G_EVAL, rubric=RUBRIC),
                    pb.MetricSpec(metric=pb.METRIC_G_EVAL, rubric_ref="rubrics/tone@2"),
                    pb.MetricSpec(metric=pb.METRIC_REGEX, check=pb.DeterministicCheck(pattern=r"\d+")),
                    pb.MetricSpec(metric=pb.METRIC_JSON_SCHEMA,
                                  check=pb.DeterministicCheck(json_schema='{"type": "object"}')),
                    pb.MetricSpec(metric=pb.METRIC_CONTAINS, check=pb.DeterministicCheck(contains=["a"])),
                    pb.MetricSpec(metric=pb.METRIC_LENGTH, check=pb.DeterministicCheck(max_chars=10)),
                    pb.MetricSpec(metric=pb.METRIC_LATENCY, check=pb.DeterministicCheck(max_latency_ms=100)),
                    pb.MetricSpec(metric=pb.METRIC_COST, check=pb.DeterministicCheck(max_cost_micros=5))])


def test_metric_specs_that_cannot_be_computed_are_refused_naming_the_field() -> None:
    error = invalid([pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS), pb.MetricSpec()])
    assert error.metadata["field"] == "metrics[1].metric"
    assert invalid([pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS)] * 17).reason == "TOO_MANY_METRICS"
    error = invalid([pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS, pass_threshold=1.5)])
    assert (error.reason, error.metadata["field"]) == ("INVALID_THRESHOLD", "metrics[0].pass_threshold")
    assert invalid([pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS, pass_threshold=-0.1)]).reason == "INVALID_THRESHOLD"


def test_g_eval_needs_exactly_one_well_formed_rubric() -> None:
    assert invalid([pb.MetricSpec(metric=pb.METRIC_G_EVAL)]).reason == "MISSING_RUBRIC"
    assert invalid([pb.MetricSpec(metric=pb.METRIC_G_EVAL, rubric=RUBRIC, rubric_ref="rubrics/x")]).reason in (
        "MISSING_RUBRIC", "INVALID_RUBRIC")
    for bad in (pb.Rubric(name="h", criteria="c", min_score=5, max_score=5),
                pb.Rubric(name="h", criteria="c", min_score=0, max_score=101),
                pb.Rubric(name="Not Valid!", criteria="c", min_score=1, max_score=5),
                pb.Rubric(name="h", criteria="  ", min_score=1, max_score=5)):
        error = invalid([pb.MetricSpec(metric=pb.METRIC_G_EVAL, rubric=bad)])
        assert error.reason == "INVALID_RUBRIC"
        assert error.metadata["field"].startswith("metrics[0].rubric")


@pytest.mark.parametrize("metric, check", [
    (pb.METRIC_REGEX, pb.DeterministicCheck()),
    (pb.METRIC_REGEX, pb.DeterministicCheck(pattern="(unclosed")),
    (pb.METRIC_REGEX, pb.DeterministicCheck(pattern="a" * 1001)),
    (pb.METRIC_JSON_SCHEMA, pb.DeterministicCheck()),
    (pb.METRIC_JSON_SCHEMA, pb.DeterministicCheck(json_schema="{not json")),
    (pb.METRIC_JSON_SCHEMA, pb.DeterministicCheck(json_schema='{"type": "no-such-type"}')),
    (pb.METRIC_JSON_SCHEMA, pb.DeterministicCheck(json_schema=json.dumps({"description": "x" * 70_000}))),
    (pb.METRIC_CONTAINS, pb.DeterministicCheck()),
    (pb.METRIC_CONTAINS, pb.DeterministicCheck(contains=[str(i) for i in range(33)])),
    (pb.METRIC_LENGTH, pb.DeterministicCheck()),
    (pb.METRIC_LENGTH, pb.DeterministicCheck(min_chars=10, max_chars=5)),
    (pb.METRIC_LATENCY, pb.DeterministicCheck()),
    (pb.METRIC_COST, pb.DeterministicCheck()),
])
def test_a_deterministic_metric_without_a_usable_check_is_invalid(metric: int, check: pb.DeterministicCheck) -> None:
    error = invalid([pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS), pb.MetricSpec(metric=metric, check=check)])
    assert error.reason == "INVALID_CHECK"
    assert error.metadata["field"] == "metrics[1].check"


def test_cases_past_their_bounds_are_refused_but_missing_data_is_left_to_each_metric() -> None:
    specs = [pb.MetricSpec(metric=pb.METRIC_EXACT_MATCH), pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS)]
    validate_case(Case(input="q", output="a"), specs)  # no reference, no contexts: not an error here
    long = "x" * (64 * 1024 + 1)
    for case, field in ((Case(input=long, output="a"), "input"), (Case(input="q", output=long), "output"),
                        (Case(input="q", output="a", reference=long), "reference"),
                        (Case(input="q", output="a", contexts=("c",) * 33), "contexts"),
                        (Case(input="q", output="a", contexts=("c", long)), "contexts")):
        with pytest.raises(ServiceError) as raised:
            validate_case(case, specs)
        assert (raised.value.reason, raised.value.metadata["field"]) == ("FIELD_TOO_LONG", field)


# --- the local metrics --------------------------------------------------------------------------


def test_faithfulness_is_the_share_of_sentences_the_detector_finds_supported(scorer: Scorer) -> None:
    case = Case(input="Does aspirin help?", output=f"{ASPIRIN} The Eiffel Tower is in Rome.", contexts=(FOOTBALL, TRIAL))
    result, spent = score(scorer, case, pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS, pass_threshold=0.8))
    assert result.metric == "faithfulness"
    assert result.score == pytest.approx(0.5)
    assert result.raw_score == pytest.approx(0.5)
    assert not result.passed
    assert [(c.claim, c.supported) for c in result.claims] == [(ASPIRIN, True), ("The Eiffel Tower is in Rome.", False)]
    assert result.claims[0].context_index == 1  # the evidence sentence is in the second context
    assert result.claims[1].context_index == -1
    assert result.judged_by == f"detector:{asyncio.run(scorer.detector()).version}"
    assert (result.judge_calls, spent) == (0, Spent())


def test_hallucination_is_one_minus_faithfulness_and_passes_at_or_below_its_threshold(scorer: Scorer) -> None:
    mixed = Case(input="q", output=f"{ASPIRIN} The Eiffel Tower is in Rome.", contexts=(TRIAL,))
    result, _ = score(scorer, mixed, pb.MetricSpec(metric=pb.METRIC_HALLUCINATION, pass_threshold=0.2))
    assert result.metric == "hallucination"
    assert result.score == pytest.approx(0.5)
    assert not result.passed
    assert len(result.claims) == 2
    grounded = Case(input="q", output=ASPIRIN, contexts=(TRIAL,))
    result, _ = score(scorer, grounded, pb.MetricSpec(metric=pb.METRIC_HALLUCINATION, pass_threshold=0.2))
    assert result.score == 0.0
    assert result.passed


def test_context_metrics_without_contexts_fail_with_a_stable_reason(scorer: Scorer) -> None:
    for metric in (pb.METRIC_FAITHFULNESS, pb.METRIC_HALLUCINATION, pb.METRIC_CONTEXT_RELEVANCY,
                   pb.METRIC_CONTEXT_PRECISION, pb.METRIC_CONTEXT_RECALL):
        error = metric_error(scorer, Case(input="q", output="a", reference="r"), pb.MetricSpec(metric=metric))
        assert error.reason == "MISSING_CONTEXTS"
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT


def test_metrics_that_compare_with_a_reference_need_one(scorer: Scorer) -> None:
    for metric in (pb.METRIC_EXACT_MATCH, pb.METRIC_CONTEXT_PRECISION, pb.METRIC_CONTEXT_RECALL):
        error = metric_error(scorer, Case(input="q", output="a", contexts=(TRIAL,)), pb.MetricSpec(metric=metric))
        assert error.reason == "MISSING_REFERENCE"


def test_an_empty_output_cannot_be_scored(scorer: Scorer) -> None:
    error = metric_error(scorer, Case(input="q", output="  ", contexts=(TRIAL,)),
                         pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS))
    assert error.reason == "MISSING_OUTPUT"


def test_answer_relevancy_without_a_judge_is_the_floored_cosine_of_input_and_output(scorer: Scorer) -> None:
    question = "What is the capital of France?"
    spec = pb.MetricSpec(metric=pb.METRIC_ANSWER_RELEVANCY)
    on_topic, _ = score(scorer, Case(input=question, output="The capital of France is Paris."), spec)
    off_topic, _ = score(scorer, Case(input=question, output="The goalkeeper signed before the transfer window."), spec)
    assert on_topic.judged_by == "embedding:all-MiniLM-L6-v2"
    assert 0.0 <= off_topic.score < 0.4 < 0.7 < on_topic.score <= 1.0
    vectors = scorer.embedder.encode([question, "The capital of France is Paris."])
    assert on_topic.score == pytest.approx(max(0.0, float(vectors[0] @ vectors[1])), abs=1e-5)


def test_context_relevancy_is_the_mean_floored_cosine_of_input_and_each_context(scorer: Scorer) -> None:
    question = "What is the capital of France?"
    spec = pb.MetricSpec(metric=pb.METRIC_CONTEXT_RELEVANCY)
    relevant, _ = score(scorer, Case(input=question, output="Paris.", contexts=(PARIS,)), spec)
    unrelated, _ = score(scorer, Case(input=question, output="Paris.", contexts=(FOOTBALL,)), spec)
    both, _ = score(scorer, Case(input=question, output="Paris.", contexts=(PARIS, FOOTBALL)), spec)
    assert unrelated.score < 0.3 < 0.6 < relevant.score
    assert both.score == pytest.approx((relevant.score + unrelated.score) / 2, abs=1e-5)


def test_context_precision_is_the_average_precision_at_the_contexts_that_support_the_reference(
        scorer: Scorer) -> None:
    spec = pb.MetricSpec(metric=pb.METRIC_CONTEXT_PRECISION)
    first, _ = score(scorer, Case(input="q", output="a", contexts=(TRIAL, FOOTBALL), reference=ASPIRIN), spec)
    second, _ = score(scorer, Case(input="q", output="a", contexts=(FOOTBALL, TRIAL), reference=ASPIRIN), spec)
    neither, _ = score(scorer, Case(input="q", output="a", contexts=(FOOTBALL, PARIS), reference=ASPIRIN), spec)
    assert (first.score, second.score, neither.score) == (1.0, 0.5, 0.0)
    assert first.judged_by.startswith("detector:")


def test_context_recall_is_the_share_of_reference_sentences_the_contexts_support(scorer: Scorer) -> None:
    spec = pb.MetricSpec(metric=pb.METRIC_CONTEXT_RECALL)
    reference = f"{ASPIRIN} Paris is the capital of France."
    half, _ = score(scorer, Case(input="q", output="a", contexts=(TRIAL,), reference=reference), spec)
    full, _ = score(scorer, Case(input="q", output="a", contexts=(TRIAL, PARIS), reference=reference), spec)
    assert (half.score, full.score) == (0.5, 1.0)


def test_exact_match_compares_after_squad_normalisation(scorer: Scorer) -> None:
    assert normalize_answer("  The Eiffel   Tower!  ") == "eiffel tower"
    spec = pb.MetricSpec(metric=pb.METRIC_EXACT_MATCH, pass_threshold=1.0)
    same, _ = score(scorer, Case(input="q", output="The Eiffel Tower!", reference="eiffel  tower"), spec)
    other, _ = score(scorer, Case(input="q", output="The Louvre", reference="eiffel tower"), spec)
    assert (same.score, same.passed, same.judged_by) == (1.0, True, "deterministic")
    assert (other.score, other.passed) == (0.0, False)


def check(scorer: Scorer, metric: int, output: str, *, latency_ms: float = 0.0, cost_micros: int = 0,
          **fields: object) -> pb.MetricResult:
    spec = pb.MetricSpec(metric=metric, check=pb.DeterministicCheck(**fields))  # type: ignore[arg-type]
    validate_specs([spec])
    result, spent = score(scorer, Case(input="q", output=output, latency_ms=latency_ms, cost_micros=cost_micros),
                          spec)
    assert result.judged_by == "deterministic"
    assert result.reasoning
    assert (result.judge_calls, spent) == (0, Spent())
    return result


def test_deterministic_checks_score_one_or_zero_and_say_why(scorer: Scorer) -> None:
    assert check(scorer, pb.METRIC_REGEX, "order 1234 shipped", pattern=r"\d{4}").score == 1.0
    assert check(scorer, pb.METRIC_REGEX, "ORDER shipped", pattern="order").score == 0.0
    assert check(scorer, pb.METRIC_REGEX, "ORDER shipped", pattern="order", ignore_case=True).score == 1.0
    schema = json.dumps({"type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}}})
    assert check(scorer, pb.METRIC_JSON_SCHEMA, '{"id": 3}', json_schema=schema).score == 1.0
    wrong = check(scorer, pb.METRIC_JSON_SCHEMA, '{"id": "three"}', json_schema=schema)
    assert wrong.score == 0.0 and "schema" in wrong.reasoning
    not_json = check(scorer, pb.METRIC_JSON_SCHEMA, "id: 3", json_schema=schema)
    assert not_json.score == 0.0 and "JSON" in not_json.reasoning
    assert check(scorer, pb.METRIC_CONTAINS, "Paris, France", contains=["Paris", "France"]).score == 1.0
    missing = check(scorer, pb.METRIC_CONTAINS, "Paris, France", contains=["paris", "Seine"], ignore_case=True)
    assert missing.score == 0.0 and "Seine" in missing.reasoning
    assert check(scorer, pb.METRIC_LENGTH, "12345", min_chars=5, max_chars=5).score == 1.0
    assert check(scorer, pb.METRIC_LENGTH, "123456", max_chars=5).score == 0.0
    assert check(scorer, pb.METRIC_LENGTH, "1234", min_chars=5).score == 0.0
    assert check(scorer, pb.METRIC_LATENCY, "a", latency_ms=99.0, max_latency_ms=100).score == 1.0
    assert check(scorer, pb.METRIC_LATENCY, "a", latency_ms=101.0, max_latency_ms=100).score == 0.0
    assert check(scorer, pb.METRIC_COST, "a", cost_micros=5, max_cost_micros=5).score == 1.0
    assert check(scorer, pb.METRIC_COST, "a", cost_micros=6, max_cost_micros=5).score == 0.0


def test_judged_metrics_without_a_judge_fail_as_a_precondition(scorer: Scorer) -> None:
    case = Case(input="q", output="a", reference="r")
    for spec in (pb.MetricSpec(metric=pb.METRIC_G_EVAL, rubric=RUBRIC), pb.MetricSpec(metric=pb.METRIC_PAIRWISE)):
        error = metric_error(scorer, case, spec)
        assert (error.reason, error.code) == ("JUDGE_NOT_CONFIGURED", grpc.StatusCode.FAILED_PRECONDITION)


def test_the_detector_is_loaded_once_on_first_use(embedder: Embedder) -> None:
    loads: list[int] = []

    def load() -> Detector:
        loads.append(1)
        return Detector.load(embedder=embedder)

    scorer = Scorer(embedder=embedder, judge=None, detector_loader=load)
    case = Case(input="q", output=ASPIRIN, contexts=(TRIAL,))
    check_only = pb.MetricSpec(metric=pb.METRIC_LENGTH, check=pb.DeterministicCheck(max_chars=1000))

    async def scenario() -> list[float]:
        await scorer.score(case, check_only, LOCAL, tenant="t")
        assert loads == []  # a metric that needs no detector does not load it
        results = await asyncio.gather(*(scorer.score(case, pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS), LOCAL,
                                                      tenant="t") for _ in range(4)))
        return [r.score for r, _ in results]

    assert asyncio.run(scenario()) == [1.0] * 4
    assert loads == [1]
