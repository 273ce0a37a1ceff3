"""gRPC servicer of llmo.evaluation.v1.EvaluationService.

Every resource belongs to the calling tenant (`llmo.core.context.current_tenant()`); another
tenant's dataset, run, gate or rubric is NOT_FOUND, never FORBIDDEN, so ids do not leak.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Sequence

import grpc

from llmo.core import context as ctx
from llmo.core.errors import (
    ServiceError,
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
)
from llmo.core.limits import MAX_ID_LEN, check_identifier, preview
from llmo.core.pagination import encode_page_token, page_size
from llmo.core.resources import fingerprint, page_after, parse_name, resource_id
from llmo.evaluation import gates as gate_checks
from llmo.evaluation import stats
from llmo.evaluation.convert import (
    check_dataset_fields,
    check_example,
    check_labels,
    dataset_proto,
    example_body,
    example_proto,
    gate_proto,
    new_etag,
    rubric_proto,
    run_proto,
    usd,
)
from llmo.evaluation.drift import DriftMonitor
from llmo.evaluation.evaluate import StoredSteps, check_judge, parse_rubric_ref, resolve, score_case
from llmo.evaluation.reliability import ReliabilityAssessor
from llmo.evaluation.runs import RunExecutor, lower_is_better
from llmo.evaluation.score_events import ScoreAnnouncer, score_row
from llmo.evaluation.scoring import Case, Scorer, rubric_hash, validate_case, validate_specs
from llmo.evaluation.settings import EvaluationSettings
from llmo.evaluation.storage import (
    AlreadyExists,
    DatasetRow,
    EtagMismatch,
    EvaluationStore,
    ExampleRow,
    Full,
    GateRow,
    InUse,
    RunRow,
    now_us,
)
from llmo.protos.common.v1 import common_pb2
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb
from llmo.protos.evaluation.v1 import evaluation_service_pb2_grpc as pb_grpc

MAX_BATCH_EXAMPLES = 1000
MAX_CRITERIA = 4000
MAX_STEPS = 20
MAX_LEVELS = 11
MAX_RUN_GATES = 16
DATASET_FIELDS = ("display_name", "description", "labels")
EXAMPLE_FIELDS = ("input", "reference", "contexts", "output", "human_scores", "metadata")
GATE_FIELDS = ("display_name", "conditions")


def _tenant() -> str:
    return ctx.current_tenant() or ""


def _etag_mismatch() -> ServiceError:
    return ServiceError(grpc.StatusCode.ABORTED, "ETAG_MISMATCH", "the resource changed since it was read; read it again")


def _mask(paths: Sequence[str], allowed: Sequence[str]) -> list[str]:
    paths = list(paths)
    if not paths:
        return list(allowed)
    unknown = [p for p in paths if p not in allowed]
    if unknown:
        raise invalid_argument("INVALID_UPDATE_MASK", f"cannot update {preview(unknown[0])!r}; updatable: "
                               f"{', '.join(allowed)}", field=preview(unknown[0]))
    return paths


def _next_token(rows: Sequence[object], limit: int, last: str, query: str = "") -> str:
    return encode_page_token({"after": last}, query=query) if len(rows) == limit and last else ""


def check_rubric(rubric: pb.Rubric, field: str = "rubric") -> None:
    if not rubric.criteria.strip():
        raise invalid_argument("INVALID_RUBRIC", f"{field}.criteria is required", field=f"{field}.criteria")
    if len(rubric.criteria) > MAX_CRITERIA or len(rubric.evaluation_steps) > MAX_STEPS or \
            len(rubric.levels) > MAX_LEVELS or any(len(s) > MAX_CRITERIA for s in rubric.evaluation_steps) or \
            any(len(level.description) > MAX_CRITERIA for level in rubric.levels):
        raise invalid_argument("FIELD_TOO_LONG", f"{field}: criteria and each step or level at most {MAX_CRITERIA} "
                               f"characters, at most {MAX_STEPS} steps and {MAX_LEVELS} levels", field=field)


class EvaluationServicer(pb_grpc.EvaluationServiceServicer):
    def __init__(self, store: EvaluationStore, scorer: Scorer, settings: EvaluationSettings, runs: RunExecutor,
                 announcer: ScoreAnnouncer, reliability: ReliabilityAssessor, drift: DriftMonitor) -> None:
        self.store, self.scorer, self.settings = store, scorer, settings
        self.runs, self.announcer, self.reliability, self.drift = runs, announcer, reliability, drift
        self.steps = StoredSteps(store)

    # --- Evaluate ------------------------------------------------------------------------------

    async def Evaluate(self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        tenant = _tenant()
        if not request.output.strip():
            raise invalid_argument("EMPTY_OUTPUT", "output is required", field="output")
        if not request.metrics:
            raise invalid_argument("NO_METRICS", "name at least one metric", field="metrics")
        validate_specs(request.metrics)
        check_judge(request.judge)
        if not (math.isfinite(request.latency_ms) and request.latency_ms >= 0):
            raise invalid_argument("INVALID_LATENCY", "latency_ms must be a finite number >= 0", field="latency_ms")
        for name, value in (("request_id", request.request_id), ("model", request.model),
                            ("prompt_version", request.prompt_version)):
            if len(value) > 256:
                raise invalid_argument("FIELD_TOO_LONG", f"{name} is longer than 256 characters", field=name)
        case = Case(input=request.input, output=request.output, contexts=tuple(request.contexts),
                    reference=request.reference, latency_ms=request.latency_ms,
                    cost_micros=request.output_cost.micros)
        validate_case(case, request.metrics)
        metrics = await resolve(self.store, tenant, request.metrics)
        request_id = request.request_id or ctx.current_request_id() or uuid.uuid4().hex
        scored = await score_case(self.scorer, case, metrics, request.judge, tenant=tenant, request_id=request_id,
                                  steps=self.steps)
        if scored.errors:
            name, error = next(iter(scored.errors.items()))
            raise ServiceError(error.code, error.reason, f"{name}: {error.detail}", {"metric": name})
        attribution = common_pb2.Attribution()
        attribution.CopyFrom(request.attribution)
        attribution.tenant = tenant
        stamp = now_us()
        rows = [score_row(r, event_id=f"evaluate/{tenant}/{request_id}/{r.metric}", source="evaluate",
                          occurred_us=stamp, attribution=attribution, model=request.model,
                          prompt_version=request.prompt_version, request_id=request.request_id)
                for r in scored.results]
        if await asyncio.to_thread(self.store.record_scores, rows):
            self.announcer.wake()
        spent = scored.spent
        return pb.EvaluateResponse(results=scored.results, usage=common_pb2.Usage(
            input_tokens=spent.input_tokens, output_tokens=spent.output_tokens), cost=usd(spent.cost_micros))

    # --- datasets ------------------------------------------------------------------------------

    async def _dataset(self, tenant: str, dataset_id: str) -> DatasetRow:
        row = await asyncio.to_thread(self.store.get_dataset, tenant, dataset_id)
        if row is None:
            raise not_found("DATASET_NOT_FOUND", f"no dataset datasets/{dataset_id}", dataset=dataset_id)
        return row

    async def CreateDataset(self, request: pb.CreateDatasetRequest, context: grpc.aio.ServicerContext
                            ) -> pb.CreateDatasetResponse:
        dataset_id = resource_id(request.dataset_id, "INVALID_DATASET_ID", "dataset_id")
        check_identifier(request.request_id, "request_id", max_len=MAX_ID_LEN)
        check_dataset_fields(request.dataset)
        stamp = now_us()
        row = DatasetRow(pk=0, tenant=_tenant(), dataset_id=dataset_id, display_name=request.dataset.display_name,
                         description=request.dataset.description, labels=dict(request.dataset.labels),
                         etag=new_etag(), version=1, create_request_id=request.request_id, create_us=stamp,
                         update_us=stamp)
        try:
            row = await asyncio.to_thread(self.store.create_dataset, row)
        except AlreadyExists:
            raise already_exists("DATASET_ALREADY_EXISTS", f"datasets/{dataset_id} exists", dataset=dataset_id) from None
        return pb.CreateDatasetResponse(dataset=dataset_proto(row))

    async def GetDataset(self, request: pb.GetDatasetRequest, context: grpc.aio.ServicerContext
                         ) -> pb.GetDatasetResponse:
        (dataset_id,) = parse_name(request.name, "datasets")
        return pb.GetDatasetResponse(dataset=dataset_proto(await self._dataset(_tenant(), dataset_id)))

    async def ListDatasets(self, request: pb.ListDatasetsRequest, context: grpc.aio.ServicerContext
                           ) -> pb.ListDatasetsResponse:
        limit = page_size(request.page_size)
        rows = await asyncio.to_thread(self.store.list_datasets, _tenant(), page_after(request.page_token), limit)
        return pb.ListDatasetsResponse(datasets=[dataset_proto(r) for r in rows],
                                       next_page_token=_next_token(rows, limit, rows[-1].dataset_id if rows else ""))

    async def UpdateDataset(self, request: pb.UpdateDatasetRequest, context: grpc.aio.ServicerContext
                            ) -> pb.UpdateDatasetResponse:
        (dataset_id,) = parse_name(request.dataset.name, "datasets")
        paths = _mask(request.update_mask.paths, DATASET_FIELDS)
        check_dataset_fields(request.dataset)
        changes = {p: dict(request.dataset.labels) if p == "labels" else getattr(request.dataset, p) for p in paths}
        try:
            row = await asyncio.to_thread(self.store.update_dataset, _tenant(), dataset_id, changes,
                                          request.dataset.etag, new_etag())
        except EtagMismatch:
            raise _etag_mismatch() from None
        if row is None:
            raise not_found("DATASET_NOT_FOUND", f"no dataset datasets/{dataset_id}", dataset=dataset_id)
        return pb.UpdateDatasetResponse(dataset=dataset_proto(row))

    async def DeleteDataset(self, request: pb.DeleteDatasetRequest, context: grpc.aio.ServicerContext
                            ) -> pb.DeleteDatasetResponse:
        (dataset_id,) = parse_name(request.name, "datasets")
        try:
            deleted = await asyncio.to_thread(self.store.delete_dataset, _tenant(), dataset_id, request.etag)
        except EtagMismatch:
            raise _etag_mismatch() from None
        except InUse:
            raise failed_precondition("DATASET_IN_USE", f"a pending or running run reads datasets/{dataset_id}; "
                                      "cancel it or wait", dataset=dataset_id) from None
        if not deleted:
            raise not_found("DATASET_NOT_FOUND", f"no dataset datasets/{dataset_id}", dataset=dataset_id)
        return pb.DeleteDatasetResponse()

    # --- examples ------------------------------------------------------------------------------

    def _new_examples(self, dataset_id: str, requests: Sequence[pb.CreateExampleRequest],
                      field: str) -> list[ExampleRow]:
        rows, seen = [], set()
        for i, r in enumerate(requests):
            where = f"{field}[{i}]" if field else "example"
            if r.parent and r.parent != f"datasets/{dataset_id}":
                raise invalid_argument("INVALID_NAME", f"{where}.parent must be empty or datasets/{dataset_id}",
                                       field=f"{where}.parent")
            example_id = resource_id(r.example_id, "INVALID_EXAMPLE_ID", f"{where}.example_id") if r.example_id \
                else uuid.uuid4().hex
            if example_id in seen:
                raise already_exists("EXAMPLE_ALREADY_EXISTS", f"example {example_id} appears twice in the batch",
                                     example=example_id)
            seen.add(example_id)
            check_example(r.example, f"{where}.example" if field else "example")
            rows.append(ExampleRow(example_id, example_body(r.example)))
        return rows

    async def _add(self, dataset_id: str, rows: list[ExampleRow]) -> list[pb.Example]:
        try:
            added = await asyncio.to_thread(self.store.add_examples, _tenant(), dataset_id, rows, new_etag(),
                                            max_examples=self.settings.max_examples_per_dataset)
        except AlreadyExists as error:
            raise already_exists("EXAMPLE_ALREADY_EXISTS", f"example {error} exists in datasets/{dataset_id}",
                                 example=str(error)) from None
        except Full:
            raise failed_precondition("DATASET_FULL", f"datasets/{dataset_id} would hold more than "
                                      f"{self.settings.max_examples_per_dataset} examples", dataset=dataset_id) from None
        if added is None:
            raise not_found("DATASET_NOT_FOUND", f"no dataset datasets/{dataset_id}", dataset=dataset_id)
        return [example_proto(dataset_id, r) for r in added]

    async def CreateExample(self, request: pb.CreateExampleRequest, context: grpc.aio.ServicerContext
                            ) -> pb.CreateExampleResponse:
        (dataset_id,) = parse_name(request.parent, "datasets")
        single = pb.CreateExampleRequest(example_id=request.example_id, example=request.example)
        added = await self._add(dataset_id, self._new_examples(dataset_id, [single], ""))
        return pb.CreateExampleResponse(example=added[0])

    async def BatchCreateExamples(self, request: pb.BatchCreateExamplesRequest, context: grpc.aio.ServicerContext
                                  ) -> pb.BatchCreateExamplesResponse:
        (dataset_id,) = parse_name(request.parent, "datasets")
        if len(request.requests) > MAX_BATCH_EXAMPLES:
            raise invalid_argument("TOO_MANY_EXAMPLES", f"at most {MAX_BATCH_EXAMPLES} examples per batch",
                                   field="requests")
        if not request.requests:
            raise invalid_argument("NO_EXAMPLES", "requests is empty", field="requests")
        added = await self._add(dataset_id, self._new_examples(dataset_id, request.requests, "requests"))
        return pb.BatchCreateExamplesResponse(examples=added)

    async def GetExample(self, request: pb.GetExampleRequest, context: grpc.aio.ServicerContext
                         ) -> pb.GetExampleResponse:
        dataset_id, example_id = parse_name(request.name, "datasets", "examples")
        row = await asyncio.to_thread(self.store.get_example, _tenant(), dataset_id, example_id)
        if row is None:
            await self._dataset(_tenant(), dataset_id)
            raise not_found("EXAMPLE_NOT_FOUND", f"no example {request.name}", example=example_id)
        return pb.GetExampleResponse(example=example_proto(dataset_id, row))

    async def ListExamples(self, request: pb.ListExamplesRequest, context: grpc.aio.ServicerContext
                           ) -> pb.ListExamplesResponse:
        (dataset_id,) = parse_name(request.parent, "datasets")
        limit = page_size(request.page_size)
        rows = await asyncio.to_thread(self.store.list_examples, _tenant(), dataset_id,
                                       page_after(request.page_token, request.parent), limit)
        if rows is None:
            raise not_found("DATASET_NOT_FOUND", f"no dataset datasets/{dataset_id}", dataset=dataset_id)
        return pb.ListExamplesResponse(
            examples=[example_proto(dataset_id, r) for r in rows],
            next_page_token=_next_token(rows, limit, rows[-1].example_id if rows else "", request.parent))

    async def UpdateExample(self, request: pb.UpdateExampleRequest, context: grpc.aio.ServicerContext
                            ) -> pb.UpdateExampleResponse:
        dataset_id, example_id = parse_name(request.example.name, "datasets", "examples")
        paths = _mask(request.update_mask.paths, EXAMPLE_FIELDS)
        tenant = _tenant()
        row = await asyncio.to_thread(self.store.get_example, tenant, dataset_id, example_id)
        if row is None:
            await self._dataset(tenant, dataset_id)
            raise not_found("EXAMPLE_NOT_FOUND", f"no example {request.example.name}", example=example_id)
        example = pb.Example.FromString(row.body)
        for path in paths:
            example.ClearField(path)
            value = getattr(request.example, path)
            if path in ("contexts",):
                example.contexts.extend(value)
            elif path == "human_scores":
                example.human_scores.update(value)
            elif path == "metadata":
                example.metadata.CopyFrom(value)
            else:
                setattr(example, path, value)
        check_example(example)
        updated = await asyncio.to_thread(self.store.update_example, tenant, dataset_id, example_id,
                                          example_body(example), new_etag())
        if updated is None:
            raise not_found("EXAMPLE_NOT_FOUND", f"no example {request.example.name}", example=example_id)
        return pb.UpdateExampleResponse(example=example_proto(dataset_id, updated))

    async def DeleteExample(self, request: pb.DeleteExampleRequest, context: grpc.aio.ServicerContext
                            ) -> pb.DeleteExampleResponse:
        dataset_id, example_id = parse_name(request.name, "datasets", "examples")
        if not await asyncio.to_thread(self.store.delete_example, _tenant(), dataset_id, example_id, new_etag()):
            await self._dataset(_tenant(), dataset_id)
            raise not_found("EXAMPLE_NOT_FOUND", f"no example {request.name}", example=example_id)
        return pb.DeleteExampleResponse()

    # --- runs ----------------------------------------------------------------------------------

    async def _run(self, tenant: str, run_id: str) -> RunRow:
        row = await asyncio.to_thread(self.store.get_run, tenant, run_id)
        if row is None:
            raise not_found("RUN_NOT_FOUND", f"no run runs/{run_id}", run=run_id)
        return row

    async def CreateRun(self, request: pb.CreateRunRequest, context: grpc.aio.ServicerContext) -> pb.CreateRunResponse:
        tenant = _tenant()
        run_id = resource_id(request.run_id, "INVALID_RUN_ID", "run_id") if request.run_id else uuid.uuid4().hex
        check_identifier(request.request_id, "request_id", max_len=MAX_ID_LEN)
        spec = request.run
        (dataset_id,) = parse_name(spec.dataset, "datasets")
        if not spec.metrics:
            raise invalid_argument("NO_METRICS", "name at least one metric", field="run.metrics")
        validate_specs(spec.metrics)
        check_judge(spec.judge, "run.judge")
        check_labels(spec.labels, "run.labels")
        if len(spec.display_name) > 1024 or len(spec.target.model) > 256 or len(spec.target.prompt_version) > 256:
            raise invalid_argument("FIELD_TOO_LONG", "display_name is at most 1024 characters, target fields 256",
                                   field="run")
        if len(spec.gates) > MAX_RUN_GATES:
            raise invalid_argument("INVALID_NAME", f"at most {MAX_RUN_GATES} gates", field="run.gates")
        for gate in spec.gates:
            (gate_id,) = parse_name(gate, "gates")
            if await asyncio.to_thread(self.store.get_gate, tenant, gate_id) is None:
                raise not_found("GATE_NOT_FOUND", f"no gate {gate}", gate=gate)
        await resolve(self.store, tenant, spec.metrics)  # RUBRIC_NOT_FOUND now rather than a failed run
        items = await asyncio.to_thread(self.store.list_examples, tenant, dataset_id, "", None)
        if items is None:
            raise not_found("DATASET_NOT_FOUND", f"no dataset datasets/{dataset_id}", dataset=dataset_id)
        if not items:
            raise failed_precondition("DATASET_EMPTY", f"datasets/{dataset_id} has no examples", dataset=dataset_id)
        if self.runs.target is None and any(not pb.Example.FromString(i.body).output for i in items):
            raise invalid_argument("MISSING_TARGET", "some examples have no output and no target endpoint is "
                                   "configured (LLMO_EVALUATION_TARGET_URL)", dataset=dataset_id)
        stored = pb.Run()
        stored.CopyFrom(spec)
        for output_only in ("name", "state", "progress", "summaries", "gate_results", "error_reason", "error_message",
                            "usage", "cost", "create_time", "start_time", "end_time"):
            stored.ClearField(output_only)
        row = RunRow(pk=0, tenant=tenant, run_id=run_id, dataset_id=dataset_id,
                     spec=stored.SerializeToString(deterministic=True), state=pb.RUN_STATE_PENDING,
                     examples_total=len(items), examples_completed=0, examples_failed=0, input_tokens=0,
                     output_tokens=0, cost_micros=0, outcome=b"", error_reason="", error_message="",
                     cancel_requested=False, create_request_id=request.request_id,
                     fingerprint=fingerprint(request, "run_id") if request.request_id else "",
                     create_us=now_us(), start_us=0, end_us=0)
        try:
            row, created = await asyncio.to_thread(self.store.create_run, row, items,
                                                   max_active=self.settings.max_active_runs)
        except AlreadyExists:
            raise already_exists("RUN_ALREADY_EXISTS", f"runs/{run_id} exists", run=run_id) from None
        except Full:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_ACTIVE_RUNS",
                               f"at most {self.settings.max_active_runs} pending or running runs per tenant",
                               {"limit": self.settings.max_active_runs}) from None
        if created:
            self.runs.submit(row.pk)
        return pb.CreateRunResponse(run=run_proto(row))

    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.GetRunResponse:
        (run_id,) = parse_name(request.name, "runs")
        return pb.GetRunResponse(run=run_proto(await self._run(_tenant(), run_id)))

    async def ListRuns(self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext) -> pb.ListRunsResponse:
        limit = page_size(request.page_size)
        dataset_id = parse_name(request.dataset, "datasets")[0] if request.dataset else ""
        if request.state not in pb.RunState.values():
            raise invalid_argument("INVALID_STATE", f"unknown run state {request.state}", field="state")
        query = f"{request.dataset}|{request.state}"
        after = page_after(request.page_token, query)
        before = None
        if after:
            created, _, pk = after.partition(":")
            if not (created.isdigit() and pk.isdigit()):
                raise invalid_argument("INVALID_PAGE_TOKEN", "page_token is malformed or belongs to another query")
            before = (int(created), int(pk))
        rows = await asyncio.to_thread(self.store.list_runs, _tenant(), before=before, limit=limit,
                                       dataset_id=dataset_id, state=int(request.state))
        last = f"{rows[-1].create_us}:{rows[-1].pk}" if rows else ""
        return pb.ListRunsResponse(runs=[run_proto(r) for r in rows], next_page_token=_next_token(rows, limit, last, query))

    async def WatchRun(self, request: pb.WatchRunRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.WatchRunResponse]:
        (run_id,) = parse_name(request.name, "runs")
        tenant = _tenant()
        row = await self._run(tenant, run_id)
        with self.runs.watch(row.pk) as notices:
            yield pb.WatchRunResponse(run=run_proto(row))
            while row.state not in (pb.RUN_STATE_SUCCEEDED, pb.RUN_STATE_FAILED, pb.RUN_STATE_CANCELLED):
                latest = None
                try:  # the poll catches runs another replica executes
                    notice = await asyncio.wait_for(notices.get(), timeout=2.0)
                    latest = notice.result
                except TimeoutError:
                    pass
                row = await self._run(tenant, run_id)
                response = pb.WatchRunResponse(run=run_proto(row))
                if latest is not None:
                    response.latest_result.CopyFrom(latest)
                yield response

    async def CancelRun(self, request: pb.CancelRunRequest, context: grpc.aio.ServicerContext) -> pb.CancelRunResponse:
        (run_id,) = parse_name(request.name, "runs")
        tenant = _tenant()
        row = await self._run(tenant, run_id)
        if row.state in (pb.RUN_STATE_PENDING, pb.RUN_STATE_RUNNING):
            cancelled = await asyncio.to_thread(self.store.request_cancel, tenant, run_id)
            row = cancelled or row
            self.runs.cancel(row.pk)
        return pb.CancelRunResponse(run=run_proto(row))

    async def ListRunResults(self, request: pb.ListRunResultsRequest, context: grpc.aio.ServicerContext
                             ) -> pb.ListRunResultsResponse:
        (run_id,) = parse_name(request.parent, "runs")
        limit = page_size(request.page_size)
        query = f"{request.parent}|{request.only_failures}"
        after = page_after(request.page_token, query)
        row = await self._run(_tenant(), run_id)
        rows = await asyncio.to_thread(self.store.results, row.pk, after=after, limit=limit,
                                       only_flagged=request.only_failures)
        return pb.ListRunResultsResponse(results=[pb.RunResult.FromString(body) for _, body in rows],
                                         next_page_token=_next_token(rows, limit, rows[-1][0] if rows else "", query))

    async def _finished_scores(self, tenant: str, name: str, field: str) -> tuple[RunRow, dict[str, dict[str, float]]]:
        (run_id,) = parse_name(name, "runs")
        row = await self._run(tenant, run_id)
        if row.state not in (pb.RUN_STATE_SUCCEEDED, pb.RUN_STATE_CANCELLED):
            raise failed_precondition("RUN_NOT_FINISHED", f"{name} has not finished (or failed)", run=name, field=field)
        by_metric: dict[str, dict[str, float]] = {}
        for example_id, body in await asyncio.to_thread(self.store.results, row.pk):
            for metric in pb.RunResult.FromString(body).results:
                by_metric.setdefault(metric.metric, {})[example_id] = metric.score
        return row, by_metric

    async def CompareRuns(self, request: pb.CompareRunsRequest, context: grpc.aio.ServicerContext
                          ) -> pb.CompareRunsResponse:
        tenant = _tenant()
        _, base = await self._finished_scores(tenant, request.base_run, "base_run")
        _, candidate = await self._finished_scores(tenant, request.candidate_run, "candidate_run")
        names = list(request.metrics) or sorted(set(base) & set(candidate))
        response = pb.CompareRunsResponse()
        for name in names:
            if name not in base or name not in candidate:
                raise failed_precondition("METRIC_NOT_IN_RUN", f"{name!r} is not scored by both runs", metric=name)
            common = sorted(set(base[name]) & set(candidate[name]))
            if not common:
                raise failed_precondition("NO_COMMON_EXAMPLES", f"no example has {name!r} in both runs", metric=name)
            c = await asyncio.to_thread(stats.paired_comparison, [base[name][e] for e in common],
                                        [candidate[name][e] for e in common], lower_is_better=lower_is_better(name))
            n = len(common)
            response.comparisons.append(pb.MetricComparison(
                metric=name, paired_examples=n, base_mean=c.base_mean, candidate_mean=c.candidate_mean,
                mean_delta=c.mean_delta, ci_low=c.ci_low, ci_high=c.ci_high, win_rate=c.wins / n,
                tie_rate=c.ties / n, loss_rate=c.losses / n))
        return response

    # --- rubrics -------------------------------------------------------------------------------

    async def PublishRubric(self, request: pb.PublishRubricRequest, context: grpc.aio.ServicerContext
                            ) -> pb.PublishRubricResponse:
        rubric_id = resource_id(request.rubric_id, "INVALID_RUBRIC_ID", "rubric_id")
        rubric = pb.Rubric()
        rubric.CopyFrom(request.rubric)
        if not rubric.name:
            rubric.name = rubric_id.replace("-", "_")
        check_rubric(rubric)
        validate_specs([pb.MetricSpec(metric=pb.METRIC_G_EVAL, rubric=rubric)])
        row, created = await asyncio.to_thread(self.store.publish_rubric, _tenant(), rubric_id,
                                               rubric.SerializeToString(deterministic=True), rubric_hash(rubric))
        steps = await asyncio.to_thread(self.store.get_steps, _tenant(), row.content_hash)
        return pb.PublishRubricResponse(rubric=rubric_proto(row, steps), created=created)

    async def GetRubric(self, request: pb.GetRubricRequest, context: grpc.aio.ServicerContext) -> pb.GetRubricResponse:
        rubric_id, version = parse_rubric_ref(request.name)
        row = await asyncio.to_thread(self.store.get_rubric, _tenant(), rubric_id, version)
        if row is None:
            raise not_found("RUBRIC_NOT_FOUND", f"no rubric {request.name}", rubric=preview(request.name))
        steps = await asyncio.to_thread(self.store.get_steps, _tenant(), row.content_hash)
        return pb.GetRubricResponse(rubric=rubric_proto(row, steps))

    async def ListRubrics(self, request: pb.ListRubricsRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ListRubricsResponse:
        limit = page_size(request.page_size)
        tenant = _tenant()
        rows = await asyncio.to_thread(self.store.list_rubrics, tenant, page_after(request.page_token), limit)
        out = [rubric_proto(r, await asyncio.to_thread(self.store.get_steps, tenant, r.content_hash)) for r in rows]
        return pb.ListRubricsResponse(rubrics=out,
                                      next_page_token=_next_token(rows, limit, rows[-1].rubric_id if rows else ""))

    # --- gates ---------------------------------------------------------------------------------

    async def _gate(self, tenant: str, gate_id: str) -> GateRow:
        row = await asyncio.to_thread(self.store.get_gate, tenant, gate_id)
        if row is None:
            raise not_found("GATE_NOT_FOUND", f"no gate gates/{gate_id}", gate=gate_id)
        return row

    @staticmethod
    def _gate_body(gate: pb.Gate) -> bytes:
        if len(gate.display_name) > 1024:
            raise invalid_argument("FIELD_TOO_LONG", "display_name is at most 1024 characters", field="gate.display_name")
        gate_checks.validate_conditions(gate.conditions)
        return pb.Gate(display_name=gate.display_name, conditions=gate.conditions).SerializeToString(deterministic=True)

    async def CreateGate(self, request: pb.CreateGateRequest, context: grpc.aio.ServicerContext
                         ) -> pb.CreateGateResponse:
        gate_id = resource_id(request.gate_id, "INVALID_GATE_ID", "gate_id")
        stamp = now_us()
        row = GateRow(gate_id, self._gate_body(request.gate), new_etag(), stamp, stamp)
        try:
            await asyncio.to_thread(self.store.create_gate, _tenant(), row)
        except AlreadyExists:
            raise already_exists("GATE_ALREADY_EXISTS", f"gates/{gate_id} exists", gate=gate_id) from None
        return pb.CreateGateResponse(gate=gate_proto(row))

    async def GetGate(self, request: pb.GetGateRequest, context: grpc.aio.ServicerContext) -> pb.GetGateResponse:
        (gate_id,) = parse_name(request.name, "gates")
        return pb.GetGateResponse(gate=gate_proto(await self._gate(_tenant(), gate_id)))

    async def ListGates(self, request: pb.ListGatesRequest, context: grpc.aio.ServicerContext) -> pb.ListGatesResponse:
        limit = page_size(request.page_size)
        rows = await asyncio.to_thread(self.store.list_gates, _tenant(), page_after(request.page_token), limit)
        return pb.ListGatesResponse(gates=[gate_proto(r) for r in rows],
                                    next_page_token=_next_token(rows, limit, rows[-1].gate_id if rows else ""))

    async def UpdateGate(self, request: pb.UpdateGateRequest, context: grpc.aio.ServicerContext
                         ) -> pb.UpdateGateResponse:
        (gate_id,) = parse_name(request.gate.name, "gates")
        paths = _mask(request.update_mask.paths, GATE_FIELDS)
        tenant = _tenant()
        current = pb.Gate.FromString((await self._gate(tenant, gate_id)).body)
        if "display_name" in paths:
            current.display_name = request.gate.display_name
        if "conditions" in paths:
            del current.conditions[:]
            current.conditions.extend(request.gate.conditions)
        try:
            row = await asyncio.to_thread(self.store.update_gate, tenant, gate_id, self._gate_body(current),
                                          request.gate.etag, new_etag())
        except EtagMismatch:
            raise _etag_mismatch() from None
        if row is None:
            raise not_found("GATE_NOT_FOUND", f"no gate gates/{gate_id}", gate=gate_id)
        return pb.UpdateGateResponse(gate=gate_proto(row))

    async def DeleteGate(self, request: pb.DeleteGateRequest, context: grpc.aio.ServicerContext
                         ) -> pb.DeleteGateResponse:
        (gate_id,) = parse_name(request.name, "gates")
        try:
            deleted = await asyncio.to_thread(self.store.delete_gate, _tenant(), gate_id, request.etag)
        except EtagMismatch:
            raise _etag_mismatch() from None
        if not deleted:
            raise not_found("GATE_NOT_FOUND", f"no gate gates/{gate_id}", gate=gate_id)
        return pb.DeleteGateResponse()

    async def CheckGate(self, request: pb.CheckGateRequest, context: grpc.aio.ServicerContext) -> pb.CheckGateResponse:
        (gate_id,) = parse_name(request.gate, "gates")
        (run_id,) = parse_name(request.run, "runs")
        tenant = _tenant()
        gate = await self._gate(tenant, gate_id)
        run = run_proto(await self._run(tenant, run_id))
        if run.state not in (pb.RUN_STATE_SUCCEEDED, pb.RUN_STATE_CANCELLED):
            raise failed_precondition("RUN_NOT_FINISHED", f"{request.run} has not finished", run=request.run)
        return pb.CheckGateResponse(result=gate_checks.check(request.gate, pb.Gate.FromString(gate.body).conditions,
                                                             run.summaries))

    # --- reliability and drift -----------------------------------------------------------------

    async def AssessJudgeReliability(self, request: pb.AssessJudgeReliabilityRequest,
                                     context: grpc.aio.ServicerContext) -> pb.AssessJudgeReliabilityResponse:
        return await self.reliability.assess(request, tenant=_tenant())

    async def GetDriftReport(self, request: pb.GetDriftReportRequest, context: grpc.aio.ServicerContext
                             ) -> pb.GetDriftReportResponse:
        tenant = _tenant()
        if request.tenant and request.tenant != tenant and not ctx.is_admin():
            raise not_found("TENANT_NOT_FOUND", "a tenant may read only its own drift reports")
        scope = request.tenant or ("" if ctx.is_admin() else tenant)  # "": every tenant (admins only)
        return pb.GetDriftReportResponse(report=await self.drift.report(request, tenant=scope))

