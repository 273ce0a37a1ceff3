"""Runs: a dataset evaluated as a long-running job, resumable after a restart and cancellable.

`CreateRun` stores the run with a snapshot of the dataset's examples (`run_items`) and submits it.
`RunExecutor` runs `run_workers` runs at once; each scores `run_example_concurrency` examples at
once. An example without an output gets one from the run's target (an OpenAI-compatible endpoint,
the router by default) first. Every example's result, counters and scores are written in one
transaction, so a crash loses at most the examples in flight: on start the executor resumes every
PENDING or RUNNING run with the examples that have no result yet.

A metric that fails on an example (a judge timing out, garbage, a score outside the scale, a
missing reference) is recorded in that example's `metric_errors` and the run goes on; an example
fails only when no output can be had. A run FAILS only when every example failed; otherwise it
SUCCEEDS, with summaries (mean, CI, ...) over the examples that were scored, and the gates it names
are checked. Cancellation lets the examples in flight finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from llmo.chat_client import ChatClient, ChatError
from llmo.core import context as ctx
from llmo.core.errors import ServiceError
from llmo.core.logging import get_logger
from llmo.evaluation import gates as gate_checks
from llmo.evaluation import stats
from llmo.evaluation.convert import usd
from llmo.evaluation.evaluate import ResolvedMetric, StoredSteps, resolve, score_case
from llmo.evaluation.score_events import ScoreAnnouncer, score_row
from llmo.evaluation.scoring import Case, Scorer
from llmo.evaluation.settings import EvaluationSettings
from llmo.evaluation.storage import EvaluationStore, ExampleOutcome, ExampleRow, RunRow, now_us
from llmo.protos.common.v1 import common_pb2
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb

log = get_logger(__name__)

SUMMARY_INTERVAL_S = 2.0  # running summaries are refreshed at most this often


@dataclass(frozen=True)
class Notice:
    """What a watcher of a run hears: the example just scored, or nothing (a state change)."""

    result: pb.RunResult | None = None


def lower_is_better(metric: str) -> bool:
    return metric == "hallucination"


def summaries_of(results: Sequence[pb.RunResult], specs: Sequence[ResolvedMetric]) -> list[pb.MetricSummary]:
    """One summary per metric over the examples that have a score for it (95% bootstrap CI of the mean)."""
    thresholds = {m.name: m.spec.pass_threshold for m in specs}
    scores: dict[str, list[float]] = {m.name: [] for m in specs}
    passed: dict[str, list[bool]] = {m.name: [] for m in specs}
    for result in results:
        for metric in result.results:
            if metric.metric in scores:
                scores[metric.metric].append(metric.score)
                passed[metric.metric].append(metric.passed)
    out = []
    for name, values in scores.items():
        if not values:
            out.append(pb.MetricSummary(metric=name))
            continue
        s = stats.summarize(values, passed=passed[name] if thresholds.get(name) else None)
        out.append(pb.MetricSummary(metric=name, count=s.count, mean=s.mean, stddev=s.stddev, min=s.min, p50=s.p50,
                                    p10=s.p10, ci_low=s.ci_low, ci_high=s.ci_high, pass_rate=s.pass_rate or 0.0))
    return out


class Target:
    """Generates the output of an example that has none, from the run's target model and prompt."""

    def __init__(self, client: ChatClient) -> None:
        self.client = client

    async def generate(self, example: pb.Example, target: pb.RunTarget, *, tenant: str) -> tuple[str, float, int,
                                                                                                   common_pb2.Usage]:
        extra: dict[str, object] = {}
        if target.prompt_version:
            template, _, version = target.prompt_version.partition("@")
            prompt: dict[str, object] = {"template": template, "variables": {"input": example.input}}
            if version.isdigit():
                prompt["version"] = int(version)
            extra["llmo"] = {"prompt": prompt}
        started = time.perf_counter()
        completion = await self.client.complete([{"role": "user", "content": example.input}], tenant=tenant,
                                                purpose="target", model=target.model, extra_body=extra or None)
        latency_ms = (time.perf_counter() - started) * 1000
        usage = common_pb2.Usage(input_tokens=completion.input_tokens, output_tokens=completion.output_tokens)
        return completion.texts[0], latency_ms, completion.cost_micros, usage


class RunExecutor:
    def __init__(self, store: EvaluationStore, scorer: Scorer, settings: EvaluationSettings,
                 announcer: ScoreAnnouncer, target: Target | None, steps: StoredSteps) -> None:
        self.store, self.scorer, self.settings = store, scorer, settings
        self.announcer, self.target, self.steps = announcer, target, steps
        self._queue: asyncio.Queue[int] = asyncio.Queue()
        self._queued: set[int] = set()
        self._cancelled: set[int] = set()
        self._watchers: dict[int, set[asyncio.Queue[Notice]]] = {}

    # --- control -------------------------------------------------------------------------------

    def submit(self, run_pk: int) -> None:
        if run_pk not in self._queued:
            self._queued.add(run_pk)
            self._queue.put_nowait(run_pk)

    def cancel(self, run_pk: int) -> None:
        self._cancelled.add(run_pk)
        self._notify(run_pk, Notice())

    @contextlib.contextmanager
    def watch(self, run_pk: int):  # type: ignore[no-untyped-def]
        """A queue of `Notice`s about the run while the block runs."""
        queue: asyncio.Queue[Notice] = asyncio.Queue()
        self._watchers.setdefault(run_pk, set()).add(queue)
        try:
            yield queue
        finally:
            watchers = self._watchers.get(run_pk, set())
            watchers.discard(queue)
            if not watchers:
                self._watchers.pop(run_pk, None)

    def _notify(self, run_pk: int, notice: Notice) -> None:
        for queue in self._watchers.get(run_pk, ()):
            queue.put_nowait(notice)

    # --- workers -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Resume what a previous process left active, then serve the queue with `run_workers` workers."""
        for row in await asyncio.to_thread(self.store.active_runs):
            if row.cancel_requested:
                self._cancelled.add(row.pk)
            self.submit(row.pk)
        workers = [asyncio.create_task(self._worker(), name=f"evaluation-run-worker-{i}")
                   for i in range(self.settings.run_workers)]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()

    async def _worker(self) -> None:
        while True:
            run_pk = await self._queue.get()
            try:
                await self._execute(run_pk)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a bug or an outage of the store: the run stays active and resumes
                log.exception("run failed to execute; it resumes on the next start", run_pk=run_pk, error=repr(error))
            finally:
                self._queued.discard(run_pk)

    async def _execute(self, run_pk: int) -> None:
        if not await asyncio.to_thread(self.store.mark_running, run_pk):
            return
        row = await asyncio.to_thread(self.store.run_by_pk, run_pk)
        assert row is not None
        self._notify(run_pk, Notice())
        spec = pb.Run.FromString(row.spec)
        try:
            metrics = await resolve(self.store, row.tenant, spec.metrics)
        except ServiceError as error:
            await self._finish(row, pb.RUN_STATE_FAILED, [], error.reason, error.message)
            return
        pending = await asyncio.to_thread(self.store.pending_items, run_pk)
        log.info("run started", run=row.run_id, tenant=row.tenant, examples=row.examples_total, pending=len(pending))
        limit = asyncio.Semaphore(self.settings.run_example_concurrency)
        last_summary = time.monotonic()

        async def one(item: ExampleRow) -> None:
            nonlocal last_summary
            async with limit:
                if run_pk in self._cancelled:
                    return
                outcome, result = await self._score_example(row, spec, metrics, item)
                if await asyncio.to_thread(self.store.record_example, run_pk, outcome):
                    self.announcer.wake()
                    if time.monotonic() - last_summary >= SUMMARY_INTERVAL_S:
                        last_summary = time.monotonic()
                        await self._refresh_summaries(row, metrics)
                    self._notify(run_pk, Notice(result))

        await asyncio.gather(*(one(item) for item in pending))
        current = await asyncio.to_thread(self.store.run_by_pk, run_pk)
        assert current is not None
        if run_pk in self._cancelled or current.cancel_requested:
            self._cancelled.discard(run_pk)
            await self._finish(current, pb.RUN_STATE_CANCELLED, metrics)
        elif current.examples_completed == 0 and current.examples_failed > 0:
            reasons = Counter(pb.RunResult.FromString(body).error_reason
                              for _, body in await asyncio.to_thread(self.store.results, run_pk))
            reason = reasons.most_common(1)[0][0]
            await self._finish(current, pb.RUN_STATE_FAILED, metrics, reason,
                               f"every example failed ({current.examples_failed}); most often {reason}")
        else:
            await self._finish(current, pb.RUN_STATE_SUCCEEDED, metrics)

    async def _score_example(self, row: RunRow, spec: pb.Run, metrics: Sequence[ResolvedMetric],
                             item: ExampleRow) -> tuple[ExampleOutcome, pb.RunResult]:
        example = pb.Example.FromString(item.body)
        example_name = f"datasets/{row.dataset_id}/examples/{item.example_id}"
        result = pb.RunResult(name=f"runs/{row.run_id}/results/{item.example_id}", example=example_name,
                              output=example.output)
        outcome = ExampleOutcome(item.example_id, b"", failed=False, flagged=False)
        request_id = f"run/{row.run_id}/{item.example_id}"
        with ctx.bind(tenant=row.tenant, request_id=request_id):
            if not example.output:
                if self.target is None:
                    result.error_reason, result.error_message = "MISSING_TARGET", "no target endpoint is configured"
                else:
                    try:
                        text, latency_ms, cost_micros, usage = await self.target.generate(example, spec.target,
                                                                                          tenant=row.tenant)
                        result.output, result.latency_ms = text, latency_ms
                        result.output_cost.CopyFrom(usd(cost_micros))
                        outcome.input_tokens += usage.input_tokens
                        outcome.output_tokens += usage.output_tokens
                        outcome.cost_micros += cost_micros
                    except ChatError as error:
                        result.error_reason = f"TARGET_{error.reason}"
                        result.error_message = error.detail
                if result.output == "" and not result.error_reason:
                    result.error_reason, result.error_message = "EMPTY_OUTPUT", "the target returned no text"
            if result.error_reason:
                outcome.failed = outcome.flagged = True
            else:
                case = Case(input=example.input, output=result.output, contexts=tuple(example.contexts),
                            reference=example.reference, latency_ms=result.latency_ms,
                            cost_micros=result.output_cost.micros)
                scored = await score_case(self.scorer, case, metrics, spec.judge, tenant=row.tenant,
                                          request_id=request_id, steps=self.steps)
                result.results.extend(scored.results)
                for name, failure in scored.errors.items():
                    result.metric_errors[name] = failure.reason
                outcome.input_tokens += scored.spent.input_tokens
                outcome.output_tokens += scored.spent.output_tokens
                outcome.cost_micros += scored.spent.cost_micros
                thresholds = {m.name: m.spec.pass_threshold for m in metrics}
                outcome.flagged = bool(scored.errors) or any(
                    thresholds.get(r.metric) and not r.passed for r in scored.results)
                stamp = now_us()
                attribution = common_pb2.Attribution(tenant=row.tenant)
                outcome.scores = [score_row(r, event_id=f"run/{row.run_id}/{item.example_id}/{r.metric}", source="run",
                                            occurred_us=stamp, attribution=attribution, model=spec.target.model,
                                            prompt_version=spec.target.prompt_version, run=f"runs/{row.run_id}",
                                            example=example_name)
                                  for r in scored.results]
        outcome.body = result.SerializeToString(deterministic=True)
        return outcome, result

    async def _results(self, run_pk: int) -> list[pb.RunResult]:
        return [pb.RunResult.FromString(body) for _, body in await asyncio.to_thread(self.store.results, run_pk)]

    async def _refresh_summaries(self, row: RunRow, metrics: Sequence[ResolvedMetric]) -> None:
        summaries = await asyncio.to_thread(summaries_of, await self._results(row.pk), metrics)
        outcome = pb.Run(summaries=summaries).SerializeToString(deterministic=True)
        await asyncio.to_thread(self.store.set_outcome, row.pk, outcome)

    async def _finish(self, row: RunRow, state: int, metrics: Sequence[ResolvedMetric], reason: str = "",
                      message: str = "") -> None:
        outcome = pb.Run()
        if metrics:
            outcome.summaries.extend(await asyncio.to_thread(summaries_of, await self._results(row.pk), metrics))
        if state == pb.RUN_STATE_SUCCEEDED:
            for gate_name in pb.Run.FromString(row.spec).gates:
                outcome.gate_results.append(await self._check_gate(row.tenant, gate_name, outcome.summaries))
        await asyncio.to_thread(self.store.finish_run, row.pk, state, outcome.SerializeToString(deterministic=True),
                                reason, message)
        log.info("run finished", run=row.run_id, tenant=row.tenant, state=pb.RunState.Name(state),  # type: ignore[arg-type]
                 reason=reason or None)
        self._notify(row.pk, Notice())

    async def _check_gate(self, tenant: str, gate_name: str, summaries: Sequence[pb.MetricSummary]) -> pb.GateResult:
        gate_id = gate_name.removeprefix("gates/")
        gate = await asyncio.to_thread(self.store.get_gate, tenant, gate_id)
        if gate is None:  # deleted since the run was created: the gate cannot pass
            return pb.GateResult(gate=gate_name, passed=False)
        try:
            return gate_checks.check(gate_name, pb.Gate.FromString(gate.body).conditions, summaries)
        except ServiceError:  # a condition on a metric the run lacks: the gate fails
            return pb.GateResult(gate=gate_name, passed=False)
