"""`make demo` step of the evaluation service: as the first tenant, build a small RAG dataset (some
answers grounded in their context, some not), gate it on the lower CI bound of faithfulness, run
it with local metrics (the faithfulness detector, MiniLM relevancy, deterministic checks: no judge
needed), watch it to the end, show the summaries and the gate, score one answer with its claim
verdicts, and check the second tenant cannot see the run."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import grpc
from rich.console import RenderableType
from rich.table import Table

from llmo.core.client import create_channel, outgoing_metadata
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb
from llmo.protos.evaluation.v1 import evaluation_service_pb2_grpc as pb_grpc

# The detector and MiniLM load on the service's first score (seconds on a cold start).
RUN_TIMEOUT_S = 180.0
CALL_TIMEOUT_S = 60.0
CONTEXT = ("The Eiffel Tower is in Paris. It was completed in 1889 for the World's Fair. "
           "It is 330 metres tall and was the tallest structure in the world until 1930.")
CASES = [
    ("Where is the Eiffel Tower?", "The Eiffel Tower is in Paris.", "The Eiffel Tower is in Paris."),
    ("When was the Eiffel Tower completed?", "It was completed in 1889.", "It was completed in 1889."),
    ("How tall is the Eiffel Tower?", "It is 330 metres tall.", "It is 330 metres tall."),
    ("Where is the Eiffel Tower?", "The Eiffel Tower stands in Rome, next to the Colosseum.",
     "The Eiffel Tower is in Paris."),
    ("When was the Eiffel Tower completed?", "It opened in 1925 after a long delay.", "It was completed in 1889."),
    ("How tall is the Eiffel Tower?", "The tower is 330 metres tall.", "It is 330 metres tall."),
]
METRICS = [pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS, pass_threshold=0.5),
           pb.MetricSpec(metric=pb.METRIC_ANSWER_RELEVANCY),
           pb.MetricSpec(metric=pb.METRIC_EXACT_MATCH),
           pb.MetricSpec(metric=pb.METRIC_LENGTH, check=pb.DeterministicCheck(max_chars=80))]
# The stack's judge is the router, whose only model here is the tiny demo model: judge locally.
LOCAL = pb.JudgeConfig(local_detector=True)


async def run_demo(endpoints: dict[str, str], *, tenants: Mapping[str, str] | None = None,
                   admin_key: str = "") -> list[RenderableType]:
    lines: list[RenderableType] = []
    keyed = list((tenants or {}).items())
    tenant, key = keyed[0] if keyed else ("", "")
    metadata = outgoing_metadata(key or None)
    suffix = uuid.uuid4().hex[:8]
    dataset_id, gate_id, run_id = f"demo-{suffix}", f"demo-gate-{suffix}", f"demo-run-{suffix}"
    async with create_channel(endpoints["evaluation"]) as channel:
        stub = pb_grpc.EvaluationServiceStub(channel)
        await stub.CreateDataset(pb.CreateDatasetRequest(dataset_id=dataset_id, dataset=pb.Dataset(
            display_name="make demo")), metadata=metadata, timeout=CALL_TIMEOUT_S)
        await stub.BatchCreateExamples(pb.BatchCreateExamplesRequest(parent=f"datasets/{dataset_id}", requests=[
            pb.CreateExampleRequest(example_id=f"e{i}", example=pb.Example(input=q, output=a, reference=ref,
                                                                           contexts=[CONTEXT]))
            for i, (q, a, ref) in enumerate(CASES)]), metadata=metadata, timeout=CALL_TIMEOUT_S)
        lines.append(f"evaluation: dataset datasets/{dataset_id} with {len(CASES)} examples"
                     + (f" as {tenant}" if tenant else ""))
        await stub.CreateGate(pb.CreateGateRequest(gate_id=gate_id, gate=pb.Gate(conditions=[pb.GateCondition(
            metric="faithfulness", aggregation=pb.AGGREGATION_CI_LOW, comparator=pb.COMPARATOR_GREATER_THAN_OR_EQUAL,
            threshold=0.5)])), metadata=metadata, timeout=CALL_TIMEOUT_S)
        await stub.CreateRun(pb.CreateRunRequest(run_id=run_id, request_id=str(uuid.uuid4()), run=pb.Run(
            dataset=f"datasets/{dataset_id}", metrics=METRICS, judge=LOCAL, gates=[f"gates/{gate_id}"])), metadata=metadata,
            timeout=CALL_TIMEOUT_S)
        run = None
        snapshots = 0
        async for reply in stub.WatchRun(pb.WatchRunRequest(name=f"runs/{run_id}"), metadata=metadata,
                                         timeout=RUN_TIMEOUT_S):
            run, snapshots = reply.run, snapshots + 1
        assert run is not None
        state = pb.RunState.Name(run.state).removeprefix("RUN_STATE_")
        lines.append(f"evaluation: runs/{run_id} {state}: {run.progress.examples_completed} scored, "
                     f"{run.progress.examples_failed} failed ({snapshots} WatchRun snapshots)")
        if run.state != pb.RUN_STATE_SUCCEEDED:
            raise RuntimeError(f"the demo run ended {state}: {run.error_reason} {run.error_message}")
        table = Table(title="run summaries (95% bootstrap CI of the mean)")
        for column in ("metric", "n", "mean", "CI", "pass rate"):
            table.add_column(column)
        for s in run.summaries:
            table.add_row(s.metric, str(s.count), f"{s.mean:.3f}", f"[{s.ci_low:.3f}, {s.ci_high:.3f}]",
                          f"{s.pass_rate:.2f}" if s.metric == "faithfulness" else "")
        lines.append(table)
        for gate in run.gate_results:
            observed = ", ".join(f"{c.condition.metric} CI low {c.observed:.3f} >= {c.condition.threshold}"
                                 for c in gate.conditions)
            lines.append(f"evaluation: gate {gate.gate}: {'PASSED' if gate.passed else 'FAILED'} ({observed})")
        scored = await stub.Evaluate(pb.EvaluateRequest(
            input="Tell me about the Eiffel Tower.", contexts=[CONTEXT], metrics=[pb.MetricSpec(
                metric=pb.METRIC_FAITHFULNESS)], judge=LOCAL,
            output="The Eiffel Tower is in Paris. It was built in 1750 by Napoleon."), metadata=metadata,
            timeout=CALL_TIMEOUT_S)
        result = scored.results[0]
        lines.append(f"evaluation: Evaluate faithfulness {result.score:.2f} by {result.judged_by}: "
                     + "; ".join(f"{'supported' if c.supported else 'NOT supported'}: {c.claim!r}"
                                 for c in result.claims))
        if len(keyed) > 1:
            other = outgoing_metadata(keyed[1][1])
            try:
                await stub.GetRun(pb.GetRunRequest(name=f"runs/{run_id}"), metadata=other, timeout=CALL_TIMEOUT_S)
                raise RuntimeError(f"{keyed[1][0]} could read {tenant}'s run")
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            lines.append(f"evaluation: {keyed[1][0]} gets NOT_FOUND for {tenant}'s run")
        await stub.DeleteDataset(pb.DeleteDatasetRequest(name=f"datasets/{dataset_id}"), metadata=metadata,
                                 timeout=CALL_TIMEOUT_S)
        lines.append("evaluation: dataset deleted; the run keeps its results")
    return lines
