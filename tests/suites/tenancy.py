"""Tenancy plans: per service, the resources tenantA creates and the probes tenantB runs.

Each probe is one request naming tenantA's resource ("theirs") and, where there is one, the
same request naming a resource that does not exist ("missing"). TenantB must get the same
answer for both (code, reason and the probe's digest of an OK response), so it can neither
use nor tell the existence of what tenantA owns, and no OK answer may contain tenantA's
markers. After every probe, tenantA's resources and ledger are as they were.
Every RPC of a service is either probed or listed as naming no tenant resource.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import message as _message

from llmo.protos.common.v1 import common_pb2
from llmo.protos.cost.v1 import cost_service_pb2 as cost_pb
from llmo.protos.cost.v1 import cost_service_pb2_grpc as cost_grpc
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as ev_pb
from llmo.protos.evaluation.v1 import evaluation_service_pb2_grpc as ev_grpc
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as ret_pb
from llmo.protos.retrieval.v1 import retrieval_service_pb2_grpc as ret_grpc
from llmo.protos.router.v1 import router_service_pb2 as rpb
from llmo.protos.router.v1 import router_service_pb2_grpc as router_grpc
from llmo.protos.visibility.v1 import visibility_service_pb2 as vis_pb
from llmo.protos.visibility.v1 import visibility_service_pb2_grpc as vis_grpc
from tests.suites.registry import (
    DEMO,
    SUITE_APP,
    TIMEOUT,
    auth,
    finished_run,
    finished_sov_run,
    ingest,
    ledger_total,
    usage_record,
    visibility_project,
)
from tests.suites.stack import Stack

A_KEY, B_KEY = "k1", "k2"
SECRET = "sec-a"  # every id tenantA creates starts with it
Request = Callable[[dict[str, Any]], _message.Message]


@dataclass
class Probe:
    name: str
    method: str
    theirs: Request
    missing: Request | None = None  # None: a list, checked by markers only
    digest: Callable[[Any], Any] = lambda response: None
    markers: tuple[str, ...] = (SECRET,)


@dataclass
class Plan:
    setup: Callable[[Stack], dict[str, Any]]
    probes: list[Probe]
    verify: Callable[[Stack, dict[str, Any]], None]
    tenant_free: frozenset[str] = field(default_factory=frozenset)  # RPCs that name no tenant resource


def usd(micros: int) -> common_pb2.Money:
    return common_pb2.Money(currency_code="USD", micros=micros)


# ---------------------------------------------------------------- cost


def _cost(stack: Stack) -> cost_grpc.CostServiceStub:
    return cost_grpc.CostServiceStub(stack.channel("cost"))


def _budget(stack: Stack, key: str = A_KEY) -> cost_pb.GetBudgetResponse:
    return _cost(stack).GetBudget(cost_pb.GetBudgetRequest(name=f"budgets/{SECRET}-budget"), metadata=auth(key),
                                  timeout=TIMEOUT)


def _cost_setup(stack: Stack) -> dict[str, Any]:
    stub, meta = _cost(stack), auth(A_KEY)
    stub.CreateBudget(cost_pb.CreateBudgetRequest(budget_id=f"{SECRET}-budget", budget=cost_pb.Budget(
        display_name=f"{SECRET} budget", window=cost_pb.BUDGET_WINDOW_MONTHLY, hard_limit=usd(50_000_000))),
        metadata=meta, timeout=TIMEOUT)
    stub.RecordUsage(cost_pb.RecordUsageRequest(records=[usage_record(f"{SECRET}-ev1")]), metadata=meta,
                     timeout=TIMEOUT)
    check = stub.CheckBudget(cost_pb.CheckBudgetRequest(estimated_cost=usd(1234), request_id=f"{SECRET}-req"),
                             metadata=meta, timeout=TIMEOUT)
    assert check.reservation_id, check
    budget = _budget(stack)
    return {"reservation": check.reservation_id, "ledger": ledger_total(stack, A_KEY, SUITE_APP),
            "reserved": budget.status.reserved.micros, "limit": budget.budget.hard_limit.micros}


def _cost_verify(stack: Stack, state: dict[str, Any]) -> None:
    budget = _budget(stack)
    assert (budget.budget.hard_limit.micros, budget.status.reserved.micros) == (state["limit"], state["reserved"])
    # Only usage recorded directly (the router's completions for tenantA arrive later, by events).
    assert ledger_total(stack, A_KEY, SUITE_APP) == state["ledger"], "tenantB's calls changed tenantA's ledger"


def _name(kind: str) -> Request:
    return lambda s: cost_pb.GetBudgetRequest(name=f"budgets/{kind}-budget")


COST_PLAN = Plan(
    setup=_cost_setup,
    verify=_cost_verify,
    tenant_free=frozenset({"ListPrices", "ComputeTco"}),
    probes=[
        Probe("GetBudget", "GetBudget", _name(SECRET), _name("sec-z")),
        Probe("DeleteBudget", "DeleteBudget", lambda s: cost_pb.DeleteBudgetRequest(name=f"budgets/{SECRET}-budget"),
              lambda s: cost_pb.DeleteBudgetRequest(name="budgets/sec-z-budget")),
        Probe("ListBudgets", "ListBudgets", lambda s: cost_pb.ListBudgetsRequest()),
        Probe("ListBudgets-tenant", "ListBudgets", lambda s: cost_pb.ListBudgetsRequest(tenant="tenantA"),
              lambda s: cost_pb.ListBudgetsRequest(tenant="tenant-nobody"),
              digest=lambda r: [b.name for b in r.budgets]),
        Probe("CheckBudget-tenant", "CheckBudget",
              lambda s: cost_pb.CheckBudgetRequest(tenant="tenantA", estimated_cost=usd(1000), request_id="b-req-1"),
              lambda s: cost_pb.CheckBudgetRequest(tenant="tenant-nobody", estimated_cost=usd(1000),
                                                   request_id="b-req-2"),
              digest=lambda r: (r.decision, r.budget)),
        Probe("ReleaseReservation", "ReleaseReservation",
              lambda s: cost_pb.ReleaseReservationRequest(reservation_id=s["reservation"]),
              lambda s: cost_pb.ReleaseReservationRequest(reservation_id="sec-z-reservation"),
              digest=lambda r: r.released),
        Probe("GetCostReport-tenant", "GetCostReport", lambda s: cost_pb.GetCostReportRequest(tenant="tenantA"),
              lambda s: cost_pb.GetCostReportRequest(tenant="tenant-nobody"),
              digest=lambda r: (r.total.requests, r.total.cost.micros)),
        Probe("GetCostReport", "GetCostReport",
              lambda s: cost_pb.GetCostReportRequest(group_by=[cost_pb.COST_DIMENSION_TENANT]), markers=("tenantA",)),
        Probe("Forecast-tenant", "Forecast", lambda s: cost_pb.ForecastRequest(tenant="tenantA"),
              lambda s: cost_pb.ForecastRequest(tenant="tenant-nobody"), digest=lambda r: r.history_total.micros),
        Probe("RecordUsage-bill-other-tenant", "RecordUsage",
              lambda s: cost_pb.RecordUsageRequest(records=[usage_record("b-ev-1", tenant="tenantA")]),
              lambda s: cost_pb.RecordUsageRequest(records=[usage_record("b-ev-2", tenant="tenant-nobody")]),
              digest=lambda r: [x.duplicate for x in r.results]),
        Probe("RecordUsage-event-id", "RecordUsage",
              lambda s: cost_pb.RecordUsageRequest(records=[usage_record(f"{SECRET}-ev1")]),
              lambda s: cost_pb.RecordUsageRequest(records=[usage_record("sec-z-ev1")]),
              digest=lambda r: [x.duplicate for x in r.results], markers=()),
        # Squatting: tenantB creating a budget with tenantA's id is like creating a fresh one.
        Probe("CreateBudget-same-id", "CreateBudget",
              lambda s: cost_pb.CreateBudgetRequest(budget_id=f"{SECRET}-budget", budget=cost_pb.Budget(
                  window=cost_pb.BUDGET_WINDOW_MONTHLY, hard_limit=usd(1000))),
              lambda s: cost_pb.CreateBudgetRequest(budget_id="sec-z-budget2", budget=cost_pb.Budget(
                  window=cost_pb.BUDGET_WINDOW_MONTHLY, hard_limit=usd(1000))), markers=()),
    ],
)


# ---------------------------------------------------------------- router


def _router(stack: Stack) -> router_grpc.RouterServiceStub:
    return router_grpc.RouterServiceStub(stack.channel("router"))


def _user(text: str = "Hello") -> list[rpb.ChatMessage]:
    return [rpb.ChatMessage(role="user", content=text)]


def _router_setup(stack: Stack) -> dict[str, Any]:
    stub, meta = _router(stack), auth(A_KEY)
    stub.CreatePromptTemplate(rpb.CreatePromptTemplateRequest(prompt_template_id=f"{SECRET}-tpl",
                                                              description=f"{SECRET} template"),
                              metadata=meta, timeout=TIMEOUT)
    stub.CreatePromptVersion(rpb.CreatePromptVersionRequest(parent=f"promptTemplates/{SECRET}-tpl",
                                                            body=f"{SECRET} system prompt", labels=["production"]),
                             metadata=meta, timeout=TIMEOUT)
    stub.CreateExperiment(rpb.CreateExperimentRequest(experiment_id=f"{SECRET}-exp", experiment=rpb.Experiment(
        allocation=rpb.EXPERIMENT_ALLOCATION_FIXED_SPLIT,
        arms=[rpb.ExperimentArm(arm="a1", model=DEMO, weight=1.0),
              rpb.ExperimentArm(arm="a2", model="demo-strong", weight=1.0)])), metadata=meta, timeout=TIMEOUT)
    out = list(stub.Complete(rpb.CompleteRequest(messages=_user(), max_tokens=2, skip_cache=True,
                                                 experiment=f"experiments/{SECRET}-exp"),
                             metadata=meta, timeout=TIMEOUT))
    return {"request_id": out[-1].request_id or out[0].request_id}


def _router_verify(stack: Stack, state: dict[str, Any]) -> None:
    stub, meta = _router(stack), auth(A_KEY)
    tpl = stub.GetPromptTemplate(rpb.GetPromptTemplateRequest(name=f"promptTemplates/{SECRET}-tpl"), metadata=meta,
                                 timeout=TIMEOUT).prompt_template
    assert (tpl.latest_version, dict(tpl.labels)) == (1, {"production": 1}), tpl
    exp = stub.GetExperiment(rpb.GetExperimentRequest(name=f"experiments/{SECRET}-exp"), metadata=meta,
                             timeout=TIMEOUT).experiment
    assert exp.state == rpb.EXPERIMENT_STATE_RUNNING, exp


def _tpl(kind: str) -> str:
    return f"promptTemplates/{kind}-tpl"


def _exp(kind: str) -> str:
    return f"experiments/{kind}-exp"


def _arms() -> rpb.Experiment:
    return rpb.Experiment(allocation=rpb.EXPERIMENT_ALLOCATION_FIXED_SPLIT,
                          arms=[rpb.ExperimentArm(arm="a1", model=DEMO, weight=1.0),
                                rpb.ExperimentArm(arm="a2", model="demo-strong", weight=1.0)])


def _pair(method: str, build: Callable[[str], _message.Message], **kw: Any) -> Probe:
    return Probe(kw.pop("name", method), method, lambda s: build(SECRET), lambda s: build("sec-z"), **kw)


ROUTER_PLAN = Plan(
    setup=_router_setup,
    verify=_router_verify,
    tenant_free=frozenset({"ListModels"}),
    probes=[
        _pair("GetPromptTemplate", lambda k: rpb.GetPromptTemplateRequest(name=_tpl(k))),
        _pair("ListPromptVersions", lambda k: rpb.ListPromptVersionsRequest(parent=_tpl(k))),
        _pair("RenderPrompt", lambda k: rpb.RenderPromptRequest(name=_tpl(k))),
        _pair("CreatePromptVersion", lambda k: rpb.CreatePromptVersionRequest(parent=_tpl(k), body="B was here")),
        _pair("SetPromptLabel", lambda k: rpb.SetPromptLabelRequest(name=_tpl(k), label="production", version=1)),
        _pair("Route", lambda k: rpb.RouteRequest(messages=_user(), prompt=rpb.PromptRef(template=_tpl(k))),
              name="Route-prompt"),
        _pair("Complete", lambda k: rpb.CompleteRequest(messages=_user(), max_tokens=2, skip_cache=True,
                                                        prompt=rpb.PromptRef(template=_tpl(k))), name="Complete-prompt"),
        _pair("GetExperiment", lambda k: rpb.GetExperimentRequest(name=_exp(k))),
        _pair("Route", lambda k: rpb.RouteRequest(messages=_user(), experiment=_exp(k)), name="Route-experiment"),
        _pair("Complete", lambda k: rpb.CompleteRequest(messages=_user(), max_tokens=2, skip_cache=True,
                                                        experiment=_exp(k)), name="Complete-experiment"),
        _pair("StopExperiment", lambda k: rpb.StopExperimentRequest(name=_exp(k))),
        Probe("RecordFeedback", "RecordFeedback",
              lambda s: rpb.RecordFeedbackRequest(request_id=s["request_id"], score=0.0, event_id="b-fb-1"),
              lambda s: rpb.RecordFeedbackRequest(request_id="sec-z-request", score=0.0, event_id="b-fb-2"),
              digest=lambda r: r.applied),
        Probe("ListPromptTemplates", "ListPromptTemplates", lambda s: rpb.ListPromptTemplatesRequest()),
        Probe("ListExperiments", "ListExperiments", lambda s: rpb.ListExperimentsRequest()),
        Probe("AuditPromptTokens", "AuditPromptTokens", lambda s: rpb.AuditPromptTokensRequest()),
        _pair("CreatePromptTemplate", lambda k: rpb.CreatePromptTemplateRequest(prompt_template_id=f"{k}-tpl"),
              name="CreatePromptTemplate-same-id", markers=()),
        _pair("CreateExperiment", lambda k: rpb.CreateExperimentRequest(experiment_id=f"{k}-exp", experiment=_arms()),
              name="CreateExperiment-same-id", markers=()),
    ],
)

# ---------------------------------------------------------------- retrieval


def _retrieval(stack: Stack) -> ret_grpc.RetrievalServiceStub:
    return ret_grpc.RetrievalServiceStub(stack.channel("retrieval"))


def _coll(kind: str) -> str:
    return f"collections/{kind}-coll"


def _rdoc(kind: str) -> str:
    return f"{_coll(kind)}/documents/{kind}-doc"


def _retrieval_setup(stack: Stack) -> dict[str, Any]:
    _retrieval(stack).CreateCollection(ret_pb.CreateCollectionRequest(
        collection_id=f"{SECRET}-coll", collection=ret_pb.Collection(display_name=f"{SECRET} collection")),
        metadata=auth(A_KEY), timeout=TIMEOUT)
    done = ingest(stack, A_KEY, f"{SECRET}-coll", [ret_pb.DocumentInput(
        document_id=f"{SECRET}-doc", text=f"{SECRET} quarterly penguin census: 4096 birds counted.")])
    assert [d.stage for d in done] == [ret_pb.INGEST_STAGE_INDEXED], done
    return {}


def _retrieval_verify(stack: Stack, state: dict[str, Any]) -> None:
    stub, meta = _retrieval(stack), auth(A_KEY)
    coll = stub.GetCollection(ret_pb.GetCollectionRequest(name=_coll(SECRET)), metadata=meta, timeout=TIMEOUT).collection
    assert (coll.display_name, coll.document_count) == (f"{SECRET} collection", 1), coll
    found = stub.Search(ret_pb.SearchRequest(collection=_coll(SECRET), query="penguin census"), metadata=meta,
                        timeout=TIMEOUT)
    assert [r.chunk.document for r in found.results] == [_rdoc(SECRET)], found


def _ingest_into(kind: str) -> ret_pb.IngestDocumentsRequest:
    return ret_pb.IngestDocumentsRequest(config=ret_pb.IngestConfig(collection=_coll(kind)))


RETRIEVAL_PLAN = Plan(
    setup=_retrieval_setup,
    verify=_retrieval_verify,
    probes=[
        _pair("GetCollection", lambda k: ret_pb.GetCollectionRequest(name=_coll(k))),
        _pair("UpdateCollection", lambda k: ret_pb.UpdateCollectionRequest(
            collection=ret_pb.Collection(name=_coll(k), display_name="B was here"))),
        _pair("DeleteCollection", lambda k: ret_pb.DeleteCollectionRequest(name=_coll(k), force=True)),
        _pair("IngestDocuments", _ingest_into),
        _pair("GetDocument", lambda k: ret_pb.GetDocumentRequest(name=_rdoc(k), view=ret_pb.DOCUMENT_VIEW_FULL)),
        _pair("ListDocuments", lambda k: ret_pb.ListDocumentsRequest(parent=_coll(k))),
        _pair("DeleteDocument", lambda k: ret_pb.DeleteDocumentRequest(name=_rdoc(k))),
        # A success would hide tenantA's document from tenantA's own search (verify catches it).
        _pair("UpdateDocumentAccess", lambda k: ret_pb.UpdateDocumentAccessRequest(
            name=_rdoc(k), access_control=ret_pb.AccessControl(allowed_principals=["user:b"]))),
        _pair("Search", lambda k: ret_pb.SearchRequest(collection=_coll(k), query="penguin census")),
        Probe("ListCollections", "ListCollections", lambda s: ret_pb.ListCollectionsRequest()),
        # Squatting: tenantB creating a collection with tenantA's id gets a fresh one of its own.
        _pair("CreateCollection", lambda k: ret_pb.CreateCollectionRequest(collection_id=f"{k}-coll"),
              name="CreateCollection-same-id", markers=()),
    ],
)


# ---------------------------------------------------------------- evaluation


def _evaluation(stack: Stack) -> ev_grpc.EvaluationServiceStub:
    return ev_grpc.EvaluationServiceStub(stack.channel("evaluation"))


def _ds(kind: str) -> str:
    return f"datasets/{kind}-ds"


def _ex(kind: str) -> str:
    return f"{_ds(kind)}/examples/{kind}-ex"


def _exact() -> list[ev_pb.MetricSpec]:
    return [ev_pb.MetricSpec(metric=ev_pb.METRIC_EXACT_MATCH)]


GATE_CONDITION = ev_pb.GateCondition(metric="exact_match", aggregation=ev_pb.AGGREGATION_MEAN,
                                     comparator=ev_pb.COMPARATOR_GREATER_THAN_OR_EQUAL, threshold=0.5)
RUBRIC = ev_pb.Rubric(name="helpful", criteria="Is it helpful?", min_score=1, max_score=5)


def _evaluation_setup(stack: Stack) -> dict[str, Any]:
    stub, meta = _evaluation(stack), auth(A_KEY)
    stub.CreateDataset(ev_pb.CreateDatasetRequest(dataset_id=f"{SECRET}-ds", dataset=ev_pb.Dataset(
        display_name=f"{SECRET} dataset")), metadata=meta, timeout=TIMEOUT)
    stub.CreateExample(ev_pb.CreateExampleRequest(parent=_ds(SECRET), example_id=f"{SECRET}-ex", example=ev_pb.Example(
        input=f"{SECRET} question", output="yes", reference="yes", human_scores={"helpful": 4})),
        metadata=meta, timeout=TIMEOUT)
    stub.PublishRubric(ev_pb.PublishRubricRequest(rubric_id=f"{SECRET}-rubric", rubric=RUBRIC), metadata=meta,
                       timeout=TIMEOUT)
    stub.CreateGate(ev_pb.CreateGateRequest(gate_id=f"{SECRET}-gate", gate=ev_pb.Gate(
        display_name=f"{SECRET} gate", conditions=[GATE_CONDITION])), metadata=meta, timeout=TIMEOUT)
    finished_run(stub, A_KEY, f"{SECRET}-run", f"{SECRET}-ds")
    return {}


def _evaluation_verify(stack: Stack, state: dict[str, Any]) -> None:
    stub, meta = _evaluation(stack), auth(A_KEY)
    dataset = stub.GetDataset(ev_pb.GetDatasetRequest(name=_ds(SECRET)), metadata=meta, timeout=TIMEOUT).dataset
    assert (dataset.display_name, dataset.example_count) == (f"{SECRET} dataset", 1), dataset
    run = stub.GetRun(ev_pb.GetRunRequest(name=f"runs/{SECRET}-run"), metadata=meta, timeout=TIMEOUT).run
    assert run.state == ev_pb.RUN_STATE_SUCCEEDED and run.summaries[0].mean == 1.0, run
    gate = stub.GetGate(ev_pb.GetGateRequest(name=f"gates/{SECRET}-gate"), metadata=meta, timeout=TIMEOUT).gate
    assert gate.display_name == f"{SECRET} gate", gate
    rubric = stub.GetRubric(ev_pb.GetRubricRequest(name=f"rubrics/{SECRET}-rubric"), metadata=meta,
                            timeout=TIMEOUT).rubric
    assert rubric.version == 1, rubric


EVALUATION_PLAN = Plan(
    setup=_evaluation_setup,
    verify=_evaluation_verify,
    probes=[
        _pair("GetDataset", lambda k: ev_pb.GetDatasetRequest(name=_ds(k))),
        _pair("UpdateDataset", lambda k: ev_pb.UpdateDatasetRequest(dataset=ev_pb.Dataset(
            name=_ds(k), display_name="B was here"))),
        _pair("DeleteDataset", lambda k: ev_pb.DeleteDatasetRequest(name=_ds(k))),
        Probe("ListDatasets", "ListDatasets", lambda s: ev_pb.ListDatasetsRequest()),
        _pair("CreateExample", lambda k: ev_pb.CreateExampleRequest(parent=_ds(k), example=ev_pb.Example(input="b"))),
        _pair("BatchCreateExamples", lambda k: ev_pb.BatchCreateExamplesRequest(
            parent=_ds(k), requests=[ev_pb.CreateExampleRequest(example=ev_pb.Example(input="b"))])),
        _pair("GetExample", lambda k: ev_pb.GetExampleRequest(name=_ex(k))),
        _pair("ListExamples", lambda k: ev_pb.ListExamplesRequest(parent=_ds(k))),
        _pair("UpdateExample", lambda k: ev_pb.UpdateExampleRequest(example=ev_pb.Example(name=_ex(k), input="b"))),
        _pair("DeleteExample", lambda k: ev_pb.DeleteExampleRequest(name=_ex(k))),
        _pair("CreateRun", lambda k: ev_pb.CreateRunRequest(run=ev_pb.Run(dataset=_ds(k), metrics=_exact()))),
        _pair("GetRun", lambda k: ev_pb.GetRunRequest(name=f"runs/{k}-run")),
        Probe("ListRuns", "ListRuns", lambda s: ev_pb.ListRunsRequest()),
        _pair("WatchRun", lambda k: ev_pb.WatchRunRequest(name=f"runs/{k}-run")),
        _pair("CancelRun", lambda k: ev_pb.CancelRunRequest(name=f"runs/{k}-run")),
        _pair("ListRunResults", lambda k: ev_pb.ListRunResultsRequest(parent=f"runs/{k}-run")),
        _pair("CompareRuns", lambda k: ev_pb.CompareRunsRequest(base_run=f"runs/{k}-run", candidate_run=f"runs/{k}-run")),
        _pair("GetRubric", lambda k: ev_pb.GetRubricRequest(name=f"rubrics/{k}-rubric")),
        Probe("ListRubrics", "ListRubrics", lambda s: ev_pb.ListRubricsRequest()),
        _pair("Evaluate", lambda k: ev_pb.EvaluateRequest(input="q", output="a", metrics=[ev_pb.MetricSpec(
            metric=ev_pb.METRIC_G_EVAL, rubric_ref=f"rubrics/{k}-rubric")])),
        _pair("GetGate", lambda k: ev_pb.GetGateRequest(name=f"gates/{k}-gate")),
        Probe("ListGates", "ListGates", lambda s: ev_pb.ListGatesRequest()),
        _pair("UpdateGate", lambda k: ev_pb.UpdateGateRequest(gate=ev_pb.Gate(name=f"gates/{k}-gate",
                                                                              display_name="B was here"))),
        _pair("DeleteGate", lambda k: ev_pb.DeleteGateRequest(name=f"gates/{k}-gate")),
        _pair("CheckGate", lambda k: ev_pb.CheckGateRequest(gate=f"gates/{k}-gate", run=f"runs/{k}-run")),
        _pair("AssessJudgeReliability", lambda k: ev_pb.AssessJudgeReliabilityRequest(
            dataset=_ds(k), metric=ev_pb.MetricSpec(metric=ev_pb.METRIC_G_EVAL, rubric=RUBRIC))),
        Probe("GetDriftReport-tenant", "GetDriftReport",
              lambda s: ev_pb.GetDriftReportRequest(metric="exact_match", tenant="tenantA"),
              lambda s: ev_pb.GetDriftReportRequest(metric="exact_match", tenant="tenant-nobody")),
        # Squatting (last: tenantB then owns resources under tenantA's ids): each gets one of its own.
        _pair("PublishRubric", lambda k: ev_pb.PublishRubricRequest(rubric_id=f"{k}-rubric", rubric=RUBRIC),
              name="PublishRubric-same-id", markers=()),
        _pair("CreateGate", lambda k: ev_pb.CreateGateRequest(gate_id=f"{k}-gate", gate=ev_pb.Gate(
            conditions=[GATE_CONDITION])), name="CreateGate-same-id", markers=()),
        _pair("CreateDataset", lambda k: ev_pb.CreateDatasetRequest(dataset_id=f"{k}-ds"),
              name="CreateDataset-same-id", markers=()),
    ],
)


# ---------------------------------------------------------------- visibility


def _visibility(stack: Stack) -> vis_grpc.VisibilityServiceStub:
    return vis_grpc.VisibilityServiceStub(stack.channel("visibility"))


def _proj(kind: str) -> str:
    return f"projects/{kind}-proj"


def _vis_run(kind: str) -> str:
    return f"{_proj(kind)}/shareOfVoiceRuns/{kind}-run"


def _vis_crawl(kind: str) -> str:
    return f"{_proj(kind)}/crawls/{kind}-crawl"


def _stamp(seconds: int) -> Any:
    from google.protobuf import timestamp_pb2

    return timestamp_pb2.Timestamp(seconds=seconds)


def _visibility_setup(stack: Stack) -> dict[str, Any]:
    stub, meta = _visibility(stack), auth(A_KEY)
    project = visibility_project(brand=f"{SECRET} brand")
    project.display_name = f"{SECRET} project"
    stub.CreateProject(vis_pb.CreateProjectRequest(project_id=f"{SECRET}-proj", project=project), metadata=meta,
                       timeout=TIMEOUT)
    finished_sov_run(stub, A_KEY, f"{SECRET}-proj", f"{SECRET}-run")
    # A crawl of a loopback address, which the crawler refuses without an allowlist: it ends at once,
    # and nothing leaves the machine.
    stub.StartCrawl(vis_pb.StartCrawlRequest(parent=_proj(SECRET), crawl_id=f"{SECRET}-crawl", crawl=vis_pb.Crawl(
        seed_urls=["http://127.0.0.1:1/"], config=vis_pb.CrawlConfig(max_pages=1))), metadata=meta, timeout=TIMEOUT)
    for _ in stub.WatchCrawl(vis_pb.WatchCrawlRequest(name=_vis_crawl(SECRET)), metadata=meta, timeout=TIMEOUT):
        pass
    stub.RecordReferralVisits(vis_pb.RecordReferralVisitsRequest(project=_proj(SECRET), visits=[vis_pb.ReferralVisit(
        visit_id=f"{SECRET}-visit", visit_time=_stamp(1_767_225_600), landing_url="https://acme.example/",
        referrer="https://chatgpt.com/")]), metadata=meta, timeout=TIMEOUT)
    return {}


def _visibility_verify(stack: Stack, state: dict[str, Any]) -> None:
    stub, meta = _visibility(stack), auth(A_KEY)
    project = stub.GetProject(vis_pb.GetProjectRequest(name=_proj(SECRET)), metadata=meta, timeout=TIMEOUT).project
    assert project.display_name == f"{SECRET} project" and project.brand.name == f"{SECRET} brand", project
    run = stub.GetShareOfVoiceRun(vis_pb.GetShareOfVoiceRunRequest(name=_vis_run(SECRET)), metadata=meta,
                                  timeout=TIMEOUT).share_of_voice_run
    assert run.state == vis_pb.JOB_STATE_SUCCEEDED and run.progress.answers_completed == 1, run
    crawl = stub.GetCrawl(vis_pb.GetCrawlRequest(name=_vis_crawl(SECRET)), metadata=meta, timeout=TIMEOUT).crawl
    assert crawl.state == vis_pb.JOB_STATE_SUCCEEDED, crawl
    traffic = stub.GetReferralTraffic(vis_pb.GetReferralTrafficRequest(project=_proj(SECRET)), metadata=meta,
                                      timeout=TIMEOUT)
    assert dict(traffic.totals_by_engine) == {"chatgpt": 1}, traffic


VISIBILITY_PLAN = Plan(
    setup=_visibility_setup,
    verify=_visibility_verify,
    probes=[
        _pair("GetProject", lambda k: vis_pb.GetProjectRequest(name=_proj(k))),
        Probe("ListProjects", "ListProjects", lambda s: vis_pb.ListProjectsRequest()),
        _pair("UpdateProject", lambda k: vis_pb.UpdateProjectRequest(project=vis_pb.Project(
            name=_proj(k), display_name="B was here"))),
        _pair("DeleteProject", lambda k: vis_pb.DeleteProjectRequest(name=_proj(k))),
        _pair("StartCrawl", lambda k: vis_pb.StartCrawlRequest(parent=_proj(k), crawl=vis_pb.Crawl(
            seed_urls=["http://127.0.0.1:1/"]))),
        _pair("GetCrawl", lambda k: vis_pb.GetCrawlRequest(name=_vis_crawl(k))),
        _pair("ListCrawls", lambda k: vis_pb.ListCrawlsRequest(parent=_proj(k))),
        _pair("WatchCrawl", lambda k: vis_pb.WatchCrawlRequest(name=_vis_crawl(k))),
        _pair("CancelCrawl", lambda k: vis_pb.CancelCrawlRequest(name=_vis_crawl(k))),
        _pair("GetPage", lambda k: vis_pb.GetPageRequest(name=f"{_vis_crawl(k)}/pages/0123456789abcdef")),
        _pair("ListPages", lambda k: vis_pb.ListPagesRequest(parent=_vis_crawl(k))),
        _pair("ScorePage", lambda k: vis_pb.ScorePageRequest(project=_proj(k), html="<h1>x</h1>"),
              name="ScorePage-project"),
        _pair("GetEntityConsistency", lambda k: vis_pb.GetEntityConsistencyRequest(project=_proj(k))),
        _pair("CreateShareOfVoiceRun", lambda k: vis_pb.CreateShareOfVoiceRunRequest(parent=_proj(k))),
        _pair("GetShareOfVoiceRun", lambda k: vis_pb.GetShareOfVoiceRunRequest(name=_vis_run(k))),
        _pair("ListShareOfVoiceRuns", lambda k: vis_pb.ListShareOfVoiceRunsRequest(parent=_proj(k))),
        _pair("WatchShareOfVoiceRun", lambda k: vis_pb.WatchShareOfVoiceRunRequest(name=_vis_run(k))),
        _pair("CancelShareOfVoiceRun", lambda k: vis_pb.CancelShareOfVoiceRunRequest(name=_vis_run(k))),
        _pair("ListAnswers", lambda k: vis_pb.ListAnswersRequest(parent=_vis_run(k))),
        _pair("GetShareOfVoiceTrend", lambda k: vis_pb.GetShareOfVoiceTrendRequest(project=_proj(k))),
        _pair("ListCoverageGaps", lambda k: vis_pb.ListCoverageGapsRequest(parent=_proj(k))),
        _pair("RecordReferralVisits", lambda k: vis_pb.RecordReferralVisitsRequest(project=_proj(k), visits=[
            vis_pb.ReferralVisit(visit_id=f"{k}-visit", visit_time=_stamp(1_767_225_700),
                                 landing_url="https://acme.example/", referrer="https://chatgpt.com/")])),
        _pair("GetReferralTraffic", lambda k: vis_pb.GetReferralTrafficRequest(project=_proj(k))),
        # Squatting (last): tenantB gets a project of its own under tenantA's id.
        _pair("CreateProject", lambda k: vis_pb.CreateProjectRequest(project_id=f"{k}-proj",
                                                                      project=visibility_project()),
              name="CreateProject-same-id", markers=()),
    ],
)


# Models and their LoRA adapters are the platform's, not a tenant's: inference names no tenant resource
# (only admin keys load and unload adapters: tests/integration/test_inference_adapters.py).
INFERENCE_PLAN = Plan(setup=lambda stack: {}, verify=lambda stack, state: None, probes=[],
                      tenant_free=frozenset({"Generate", "CountTokens", "ListModels", "GetModel", "LoadAdapter",
                                             "UnloadAdapter", "ListAdapters"}))

PLANS: dict[str, Plan] = {"cost": COST_PLAN, "router": ROUTER_PLAN, "inference": INFERENCE_PLAN,
                         "retrieval": RETRIEVAL_PLAN, "evaluation": EVALUATION_PLAN, "visibility": VISIBILITY_PLAN}
