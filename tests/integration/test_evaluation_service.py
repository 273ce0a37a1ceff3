"""The evaluation service over real gRPC with a real nats-server, SQLite and PostgreSQL, the real
faithfulness detector and MiniLM, and a scriptable judge on 127.0.0.1: datasets, Evaluate, runs
(watch, resume after a restart, cancel, compare), gates, rubrics and reliability."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb
from llmo.protos.evaluation.v1 import evaluation_service_pb2_grpc as pb_grpc
from tests.integration.evaluation_harness import (
    A,
    B,
    FakeJudge,
    code_of,
    prompt_text,
    score_answer,
    settings,
    started,
)

CONTEXT = ("The Eiffel Tower is in Paris. It was completed in 1889 and is 330 metres tall. "
           "It was designed by the company of Gustave Eiffel.")


@pytest.fixture
async def stub(database_url: str, tmp_path: Path) -> AsyncIterator[pb_grpc.EvaluationServiceStub]:
    running, channel, client = await started(settings(database_url, tmp_path))
    try:
        yield client
    finally:
        await channel.close()
        await running.stop()


def example(i: int, **fields: Any) -> pb.CreateExampleRequest:
    fields.setdefault("input", f"question {i}")
    return pb.CreateExampleRequest(example_id=f"e{i}", example=pb.Example(**fields))


async def make_dataset(stub: pb_grpc.EvaluationServiceStub, dataset_id: str, examples: list[pb.CreateExampleRequest],
                       meta: list[tuple[str, str]] = A) -> None:
    await stub.CreateDataset(pb.CreateDatasetRequest(dataset_id=dataset_id), metadata=meta)
    await stub.BatchCreateExamples(pb.BatchCreateExamplesRequest(parent=f"datasets/{dataset_id}", requests=examples),
                                   metadata=meta)


async def finish(stub: pb_grpc.EvaluationServiceStub, name: str, meta: list[tuple[str, str]] = A) -> list[pb.Run]:
    snapshots = []
    async with asyncio.timeout(120):
        async for reply in stub.WatchRun(pb.WatchRunRequest(name=name), metadata=meta):
            snapshots.append(reply.run)
    return snapshots


async def test_datasets_and_examples_are_versioned_tenant_scoped_and_checked(stub: pb_grpc.EvaluationServiceStub) -> None:
    created = (await stub.CreateDataset(pb.CreateDatasetRequest(dataset_id="qa", dataset=pb.Dataset(
        display_name="QA", labels={"team": "search"})), metadata=A)).dataset
    assert created.name == "datasets/qa" and created.example_count == 0 and created.etag
    assert await code_of(stub.CreateDataset(pb.CreateDatasetRequest(dataset_id="qa"), metadata=A)) == (
        grpc.StatusCode.ALREADY_EXISTS, "DATASET_ALREADY_EXISTS")
    assert await code_of(stub.CreateDataset(pb.CreateDatasetRequest(dataset_id="Bad_Id"), metadata=A)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_DATASET_ID")
    batch = [example(i, reference=f"answer {i}") for i in range(3)]
    added = (await stub.BatchCreateExamples(pb.BatchCreateExamplesRequest(parent="datasets/qa", requests=batch),
                                            metadata=A)).examples
    assert [e.name for e in added] == [f"datasets/qa/examples/e{i}" for i in range(3)]
    # all or none: one bad example refuses the whole batch
    bad = [example(7), example(8, input="")]
    assert await code_of(stub.BatchCreateExamples(pb.BatchCreateExamplesRequest(parent="datasets/qa", requests=bad),
                                                  metadata=A)) == (grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_INPUT")
    assert await code_of(stub.CreateExample(pb.CreateExampleRequest(parent="datasets/qa", example_id="e1",
                                                                    example=pb.Example(input="again")), metadata=A)) == (
        grpc.StatusCode.ALREADY_EXISTS, "EXAMPLE_ALREADY_EXISTS")
    dataset = (await stub.GetDataset(pb.GetDatasetRequest(name="datasets/qa"), metadata=A)).dataset
    assert dataset.example_count == 3 and dataset.etag != created.etag  # example changes bump the version
    first = await stub.ListExamples(pb.ListExamplesRequest(parent="datasets/qa", page_size=2), metadata=A)
    rest = await stub.ListExamples(pb.ListExamplesRequest(parent="datasets/qa", page_token=first.next_page_token),
                                   metadata=A)
    assert [e.name[-2:] for e in [*first.examples, *rest.examples]] == ["e0", "e1", "e2"] and not rest.next_page_token
    updated = (await stub.UpdateExample(pb.UpdateExampleRequest(
        example=pb.Example(name="datasets/qa/examples/e0", output="an output"),
        update_mask=field_mask_pb2.FieldMask(paths=["output"])), metadata=A)).example
    assert updated.output == "an output" and updated.reference == "answer 0" and updated.input == "question 0"
    # another tenant sees nothing, under the same names
    for call in (stub.GetDataset(pb.GetDatasetRequest(name="datasets/qa"), metadata=B),
                 stub.GetExample(pb.GetExampleRequest(name="datasets/qa/examples/e0"), metadata=B),
                 stub.DeleteDataset(pb.DeleteDatasetRequest(name="datasets/qa"), metadata=B)):
        assert await code_of(call) == (grpc.StatusCode.NOT_FOUND, "DATASET_NOT_FOUND")
    assert (await stub.ListDatasets(pb.ListDatasetsRequest(), metadata=B)).datasets == []
    assert await code_of(stub.DeleteDataset(pb.DeleteDatasetRequest(name="datasets/qa", etag="stale"), metadata=A)) == (
        grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    await stub.DeleteDataset(pb.DeleteDatasetRequest(name="datasets/qa"), metadata=A)
    assert await code_of(stub.GetDataset(pb.GetDatasetRequest(name="datasets/qa"), metadata=A)) == (
        grpc.StatusCode.NOT_FOUND, "DATASET_NOT_FOUND")


async def test_evaluate_scores_locally_without_a_judge_and_names_what_is_missing(
        stub: pb_grpc.EvaluationServiceStub) -> None:
    metrics = [pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS, pass_threshold=0.5),
               pb.MetricSpec(metric=pb.METRIC_EXACT_MATCH),
               pb.MetricSpec(metric=pb.METRIC_JSON_SCHEMA, check=pb.DeterministicCheck(
                   json_schema=json.dumps({"type": "object"}))),
               pb.MetricSpec(metric=pb.METRIC_LATENCY, check=pb.DeterministicCheck(max_latency_ms=500))]
    reply = await stub.Evaluate(pb.EvaluateRequest(
        input="Where is the Eiffel Tower?", output="The Eiffel Tower is in Paris.", contexts=[CONTEXT],
        reference="the eiffel tower is in paris", metrics=metrics, latency_ms=120), metadata=A)
    by_name = {r.metric: r for r in reply.results}
    assert set(by_name) == {"faithfulness", "exact_match", "json_schema", "latency"}
    assert by_name["faithfulness"].score == 1.0 and by_name["faithfulness"].passed
    assert by_name["faithfulness"].judged_by.startswith("detector:")
    assert by_name["exact_match"].score == 1.0  # SQuAD normalisation: case, punctuation
    assert by_name["json_schema"].score == 0.0 and by_name["latency"].score == 1.0
    assert reply.usage.input_tokens == 0 and reply.cost.micros == 0  # no judge was called
    bad = {
        "EMPTY_OUTPUT": pb.EvaluateRequest(input="q", metrics=metrics),
        "NO_METRICS": pb.EvaluateRequest(input="q", output="a"),
        "INVALID_CHECK": pb.EvaluateRequest(input="q", output="a", metrics=[pb.MetricSpec(
            metric=pb.METRIC_REGEX, check=pb.DeterministicCheck(pattern="(unclosed"))]),
        "INVALID_JUDGE_CONFIG": pb.EvaluateRequest(input="q", output="a", judge=pb.JudgeConfig(samples=99),
                                                   metrics=[pb.MetricSpec(metric=pb.METRIC_EXACT_MATCH)]),
    }
    for reason, request in bad.items():
        assert await code_of(stub.Evaluate(request, metadata=A)) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    missing = pb.EvaluateRequest(input="q", output="a", metrics=[pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS)])
    code, _ = await code_of(stub.Evaluate(missing, metadata=A))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    g_eval = pb.EvaluateRequest(input="q", output="a", metrics=[pb.MetricSpec(
        metric=pb.METRIC_G_EVAL, rubric=pb.Rubric(name="helpful", criteria="Is it helpful?", min_score=1,
                                                  max_score=5))])
    assert await code_of(stub.Evaluate(g_eval, metadata=A)) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                 "JUDGE_NOT_CONFIGURED")


async def test_a_run_scores_every_example_summarises_with_a_ci_and_checks_its_gates(
        stub: pb_grpc.EvaluationServiceStub) -> None:
    good = [example(i, input="Where is the Eiffel Tower?", output="The Eiffel Tower is in Paris.", contexts=[CONTEXT],
                    reference="The Eiffel Tower is in Paris.") for i in range(6)]
    await make_dataset(stub, "towers", good)
    await stub.CreateGate(pb.CreateGateRequest(gate_id="release", gate=pb.Gate(conditions=[pb.GateCondition(
        metric="faithfulness", aggregation=pb.AGGREGATION_CI_LOW, comparator=pb.COMPARATOR_GREATER_THAN_OR_EQUAL,
        threshold=0.8)])), metadata=A)
    await stub.CreateGate(pb.CreateGateRequest(gate_id="strict", gate=pb.Gate(conditions=[pb.GateCondition(
        metric="contains", aggregation=pb.AGGREGATION_MEAN, comparator=pb.COMPARATOR_GREATER_THAN_OR_EQUAL,
        threshold=0.5)])), metadata=A)
    metrics = [pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS),
               pb.MetricSpec(metric=pb.METRIC_CONTAINS, check=pb.DeterministicCheck(contains=["London"]))]
    run = pb.Run(dataset="datasets/towers", metrics=metrics, gates=["gates/release", "gates/strict"])
    created = (await stub.CreateRun(pb.CreateRunRequest(run_id="r1", run=run, request_id="req-1"), metadata=A)).run
    again = (await stub.CreateRun(pb.CreateRunRequest(run_id="r1", run=run, request_id="req-1"), metadata=A)).run
    assert created.name == again.name == "runs/r1"  # a retry returns the first call's run
    snapshots = await finish(stub, "runs/r1")
    final = snapshots[-1]
    assert final.state == pb.RUN_STATE_SUCCEEDED and final.progress.examples_completed == 6
    assert [s.progress.examples_completed for s in snapshots] == sorted(s.progress.examples_completed for s in snapshots)
    summary = {s.metric: s for s in final.summaries}
    assert summary["faithfulness"].count == 6 and summary["faithfulness"].ci_low == 1.0
    assert summary["contains"].mean == 0.0
    gates = {g.gate: g.passed for g in final.gate_results}
    assert gates == {"gates/release": True, "gates/strict": False}
    results = (await stub.ListRunResults(pb.ListRunResultsRequest(parent="runs/r1"), metadata=A)).results
    assert len(results) == 6 and all(len(r.results) == 2 for r in results)
    checked = (await stub.CheckGate(pb.CheckGateRequest(gate="gates/release", run="runs/r1"), metadata=A)).result
    assert checked.passed and checked.conditions[0].observed == 1.0
    # the other tenant cannot see the run, its results or the gate
    assert await code_of(stub.GetRun(pb.GetRunRequest(name="runs/r1"), metadata=B)) == (
        grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND")
    assert await code_of(stub.CheckGate(pb.CheckGateRequest(gate="gates/release", run="runs/r1"), metadata=B)) == (
        grpc.StatusCode.NOT_FOUND, "GATE_NOT_FOUND")
    # a worse candidate on the same examples, compared example by example
    for i in range(6):
        await stub.UpdateExample(pb.UpdateExampleRequest(
            example=pb.Example(name=f"datasets/towers/examples/e{i}", output="The tower is in London. It is 20 m tall."),
            update_mask=field_mask_pb2.FieldMask(paths=["output"])), metadata=A)
    await stub.CreateRun(pb.CreateRunRequest(run_id="r2", run=pb.Run(dataset="datasets/towers", metrics=metrics)),
                         metadata=A)
    await finish(stub, "runs/r2")
    comparison = (await stub.CompareRuns(pb.CompareRunsRequest(base_run="runs/r1", candidate_run="runs/r2"),
                                         metadata=A)).comparisons
    by_metric = {c.metric: c for c in comparison}
    faith = by_metric["faithfulness"]
    assert faith.paired_examples == 6 and faith.mean_delta < 0 and faith.ci_high < 0 and faith.loss_rate == 1.0
    assert by_metric["contains"].win_rate == 1.0


async def test_run_requests_that_cannot_run_are_refused_up_front(stub: pb_grpc.EvaluationServiceStub) -> None:
    await stub.CreateDataset(pb.CreateDatasetRequest(dataset_id="empty"), metadata=A)
    metrics = [pb.MetricSpec(metric=pb.METRIC_EXACT_MATCH)]
    assert await code_of(stub.CreateRun(pb.CreateRunRequest(run=pb.Run(dataset="datasets/empty", metrics=metrics)),
                                        metadata=A)) == (grpc.StatusCode.FAILED_PRECONDITION, "DATASET_EMPTY")
    await make_dataset(stub, "no-outputs", [example(1)])
    assert await code_of(stub.CreateRun(pb.CreateRunRequest(run=pb.Run(dataset="datasets/no-outputs",
                                                                       metrics=metrics)), metadata=A)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "MISSING_TARGET")
    assert await code_of(stub.CreateRun(pb.CreateRunRequest(run=pb.Run(dataset="datasets/nope", metrics=metrics)),
                                        metadata=A)) == (grpc.StatusCode.NOT_FOUND, "DATASET_NOT_FOUND")
    assert await code_of(stub.CreateRun(pb.CreateRunRequest(run=pb.Run(
        dataset="datasets/no-outputs", metrics=metrics, gates=["gates/nope"])), metadata=A)) == (
        grpc.StatusCode.NOT_FOUND, "GATE_NOT_FOUND")
    assert await code_of(stub.CreateRun(pb.CreateRunRequest(run=pb.Run(dataset="datasets/no-outputs")), metadata=A)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "NO_METRICS")


async def test_rubrics_are_versioned_by_content(stub: pb_grpc.EvaluationServiceStub) -> None:
    rubric = pb.Rubric(name="helpful", criteria="Does the answer help?", min_score=1, max_score=5)
    first = await stub.PublishRubric(pb.PublishRubricRequest(rubric_id="helpful", rubric=rubric), metadata=A)
    same = await stub.PublishRubric(pb.PublishRubricRequest(rubric_id="helpful", rubric=rubric), metadata=A)
    assert first.created and not same.created and same.rubric.name == "rubrics/helpful@1"
    rubric.criteria = "Does the answer help the user do the task?"
    second = await stub.PublishRubric(pb.PublishRubricRequest(rubric_id="helpful", rubric=rubric), metadata=A)
    assert second.created and second.rubric.version == 2
    latest = (await stub.GetRubric(pb.GetRubricRequest(name="rubrics/helpful"), metadata=A)).rubric
    old = (await stub.GetRubric(pb.GetRubricRequest(name="rubrics/helpful@1"), metadata=A)).rubric
    assert latest.version == 2 and old.rubric.criteria == "Does the answer help?"
    listed = (await stub.ListRubrics(pb.ListRubricsRequest(), metadata=A)).rubrics
    assert [r.name for r in listed] == ["rubrics/helpful@2"]
    assert await code_of(stub.GetRubric(pb.GetRubricRequest(name="rubrics/helpful"), metadata=B)) == (
        grpc.StatusCode.NOT_FOUND, "RUBRIC_NOT_FOUND")
    bad = pb.Rubric(name="x", criteria="c", min_score=5, max_score=1)
    assert await code_of(stub.PublishRubric(pb.PublishRubricRequest(rubric_id="bad", rubric=bad), metadata=A)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_RUBRIC")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_judged_runs_record_bad_judgements_per_example_and_resume_after_a_restart(
        database_url: str, tmp_path: Path) -> None:
    # The judge scores 4 on every example, except that it answers garbage for "q3" and a score off the
    # scale for "q4"; it is slow, so the service is stopped while the run is in flight.
    def score_of(text: str) -> int:
        return 17 if "q4" in text else 4

    def answer(body: dict[str, Any]) -> str:
        return "no idea" if "q3" in prompt_text(body) and "Score" in prompt_text(body) else score_answer(score_of)(body)

    judge = await FakeJudge(answer, delay_s=0.2).start()
    config = settings(database_url, tmp_path, judge_url=judge.url, judge_concurrency=2, run_example_concurrency=2)
    running, channel, client = await started(config)
    try:
        examples = [example(i, input=f"q{i}", output=f"answer {i}") for i in range(12)]
        await make_dataset(client, "judged", examples)
        rubric = pb.Rubric(name="helpful", criteria="Does the answer help?", min_score=1, max_score=5)
        run = pb.Run(dataset="datasets/judged", metrics=[pb.MetricSpec(metric=pb.METRIC_G_EVAL, rubric=rubric)])
        await client.CreateRun(pb.CreateRunRequest(run_id="judged", run=run), metadata=A)
        async with asyncio.timeout(60):
            while (await client.GetRun(pb.GetRunRequest(name="runs/judged"), metadata=A)).run.progress.examples_completed < 2:
                await asyncio.sleep(0.1)
    finally:
        await channel.close()
        await running.stop()
    interrupted = len(judge.requests)
    running, channel, client = await started(config)
    try:
        final = (await finish(client, "runs/judged"))[-1]
        assert final.state == pb.RUN_STATE_SUCCEEDED
        assert final.progress.examples_completed == 12 and final.progress.examples_failed == 0
        results = {r.example.rsplit("/", 1)[1]: r for r in
                   (await client.ListRunResults(pb.ListRunResultsRequest(parent="runs/judged"), metadata=A)).results}
        assert len(results) == 12
        assert dict(results["e3"].metric_errors) == {"g_eval:helpful": "JUDGE_BAD_OUTPUT"}
        assert dict(results["e4"].metric_errors) == {"g_eval:helpful": "JUDGE_SCORE_OUT_OF_RANGE"}
        scored = [r.results[0] for k, r in results.items() if k not in ("e3", "e4")]
        assert all(s.raw_score == 4 and s.score == 0.75 for s in scored)
        summary = final.summaries[0]
        assert summary.count == 10 and summary.mean == 0.75
        # the examples scored before the restart were not judged again
        assert len(judge.requests) - interrupted < 12 + 4
        failures = (await client.ListRunResults(pb.ListRunResultsRequest(parent="runs/judged", only_failures=True),
                                                metadata=A)).results
        assert {r.example.rsplit("/", 1)[1] for r in failures} == {"e3", "e4"}
    finally:
        await channel.close()
        await running.stop()
        await judge.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_cancelled_run_stops_after_the_examples_in_flight(database_url: str, tmp_path: Path) -> None:
    judge = await FakeJudge(score_answer(lambda _: 3), delay_s=0.3).start()
    config = settings(database_url, tmp_path, judge_url=judge.url, run_example_concurrency=1)
    running, channel, client = await started(config)
    try:
        await make_dataset(client, "slow", [example(i, output="a") for i in range(20)])
        rubric = pb.Rubric(name="helpful", criteria="Does the answer help?", min_score=1, max_score=5)
        await client.CreateRun(pb.CreateRunRequest(run_id="slow", run=pb.Run(
            dataset="datasets/slow", metrics=[pb.MetricSpec(metric=pb.METRIC_G_EVAL, rubric=rubric)])), metadata=A)
        await asyncio.sleep(1.0)
        await client.CancelRun(pb.CancelRunRequest(name="runs/slow"), metadata=A)
        final = (await finish(client, "runs/slow"))[-1]
        assert final.state == pb.RUN_STATE_CANCELLED and 0 < final.progress.examples_completed < 20
        # cancelling a finished run is a no-op
        again = (await client.CancelRun(pb.CancelRunRequest(name="runs/slow"), metadata=A)).run
        assert again.state == pb.RUN_STATE_CANCELLED
    finally:
        await channel.close()
        await running.stop()
        await judge.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_judge_reliability_measures_agreement_consistency_and_position_bias(
        database_url: str, tmp_path: Path) -> None:
    # Human scores 1..5; a consistent judge that agrees with them, and a judge that always prefers answer A.
    def answer(body: dict[str, Any]) -> str:
        text = prompt_text(body)
        if "Which answer is better" in text:
            return "A"
        return score_answer(lambda t: int(t.split("quality ")[1][0]) if "quality " in t else 3)(body)

    judge = await FakeJudge(answer).start()
    running, channel, client = await started(settings(database_url, tmp_path, judge_url=judge.url))
    try:
        examples = [example(i, input=f"q{i}", output=f"answer of quality {1 + i % 5}", reference="ref",
                            human_scores={"helpful": 1 + i % 5}) for i in range(10)]
        await make_dataset(client, "labelled", examples)
        rubric = pb.Rubric(name="helpful", criteria="Does the answer help?", min_score=1, max_score=5)
        reply = await client.AssessJudgeReliability(pb.AssessJudgeReliabilityRequest(
            dataset="datasets/labelled", metric=pb.MetricSpec(metric=pb.METRIC_G_EVAL, rubric=rubric), repeats=3,
            judge=pb.JudgeConfig(temperature=0.7)), metadata=A)
        r = reply.reliability
        assert r.examples == 10 and r.failed_examples == 0
        assert r.spearman == pytest.approx(1.0) and r.kendall_tau == pytest.approx(1.0)
        assert r.mean_absolute_error == pytest.approx(0.0) and r.cohen_kappa == pytest.approx(1.0)
        assert r.self_consistency == pytest.approx(1.0) and r.flip_rate == 0.0
        assert r.ci_low <= r.score_mean <= r.ci_high
        # every repeat is a real judge call: 10 examples x 3 repeats, plus the generated steps once
        assert reply.usage.input_tokens == 10 * (10 * 3 + 1)
        pairwise = await client.AssessJudgeReliability(pb.AssessJudgeReliabilityRequest(
            dataset="datasets/labelled", metric=pb.MetricSpec(metric=pb.METRIC_PAIRWISE), repeats=1,
            label_key="helpful"), metadata=A)
        assert pairwise.reliability.swap_flip_rate == 1.0 and pairwise.reliability.position_bias == 1.0
        assert await code_of(client.AssessJudgeReliability(pb.AssessJudgeReliabilityRequest(
            dataset="datasets/labelled", metric=pb.MetricSpec(metric=pb.METRIC_G_EVAL, rubric=rubric), repeats=11),
            metadata=A)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REPEATS")
        assert await code_of(client.AssessJudgeReliability(pb.AssessJudgeReliabilityRequest(
            dataset="datasets/labelled", metric=pb.MetricSpec(metric=pb.METRIC_G_EVAL, rubric=rubric),
            label_key="nobody"), metadata=A)) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_HUMAN_LABELS")
    finally:
        await channel.close()
        await running.stop()
        await judge.stop()
