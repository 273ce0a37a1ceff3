"""Which services the generated suites run against, and what they already know fails.

A service joins the bad-input and tenancy suites with one `ServiceEntry` in `SERVICES`:
how to start it (on free ports, against the shared nats-server), its gRPC service
descriptor, its HTTP app (routes are discovered from the aiohttp router), string hints
that let generated requests reach past the first validation, a known-good check run
before and after the generated traffic, and its tenancy fixtures (tenancy.py).

`KNOWN_FAILURES` is the one table of generated cases that fail against today's code:
each becomes `xfail(strict=True)`, so a fix makes its entry fail loudly until removed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from google.protobuf import descriptor as _descriptor
from google.protobuf import timestamp_pb2

from llmo.core.settings import PlatformSettings
from llmo.protos.common.v1 import common_pb2
from llmo.protos.cost.v1 import cost_service_pb2 as cost_pb
from llmo.protos.cost.v1 import cost_service_pb2_grpc as cost_grpc
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as ev_pb
from llmo.protos.evaluation.v1 import evaluation_service_pb2_grpc as ev_grpc
from llmo.protos.inference.v1 import inference_service_pb2 as inf_pb
from llmo.protos.inference.v1 import inference_service_pb2_grpc as inf_grpc
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as ret_pb
from llmo.protos.retrieval.v1 import retrieval_service_pb2_grpc as ret_grpc
from llmo.protos.router.v1 import router_service_pb2 as router_pb
from llmo.protos.router.v1 import router_service_pb2_grpc as router_grpc
from llmo.protos.visibility.v1 import visibility_service_pb2 as vis_pb
from llmo.protos.visibility.v1 import visibility_service_pb2_grpc as vis_grpc
from tests.suites.stack import UPSTREAM_KEY_ENV, Endpoint, Stack, platform

DEMO = "llmo-demo"
TIMEOUT = 120.0
SUITE_APP = "suite"  # the application of every usage the suites record directly


def auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


@dataclass(frozen=True)
class HttpRoute:
    method: str
    path: str  # aiohttp canonical form, e.g. /v1/models/{model}

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class ServiceEntry:
    name: str
    descriptor: _descriptor.ServiceDescriptor
    start: Callable[[Stack], Awaitable[Endpoint]]
    # Builds the service's aiohttp app without starting anything (route discovery at collection).
    http_app: Callable[[], web.Application] | None = None
    # Valid-looking values generated strings are drawn from, besides random text.
    string_hints: tuple[str, ...] = ()
    # Valid request bodies per POST route; the suite mutates one field at a time.
    http_bodies: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Run before the generated traffic; returns state for `verify`.
    seed: Callable[[Stack], Any] = lambda stack: None
    # Run after it: the service still serves a known-good request, and nothing accepted is lost.
    verify: Callable[[Stack, Any], None] = lambda stack, state: None

    @property
    def domain(self) -> str:
        return f"llmo.{self.name}"

    def methods(self) -> list[_descriptor.MethodDescriptor]:
        return list(self.descriptor.methods)

    def routes(self) -> list[HttpRoute]:
        if self.http_app is None:
            return []
        return sorted({HttpRoute(r.method, r.resource.canonical) for r in self.http_app().router.routes()
                       if r.resource is not None and r.method != "HEAD"}, key=lambda r: r.label)


def endpoint_of(running: Any) -> Endpoint:
    """The endpoint of a started service's handle (its own Running* dataclass, or the service kit's)."""
    app = None
    for attr in ("runner", "http_runner", "_runner"):
        runner = getattr(running, attr, None)
        if runner is not None:
            app = runner.app
            break
    return Endpoint(f"127.0.0.1:{running.port}", getattr(running, "http_port", None), app, running.stop, running)


# ---------------------------------------------------------------- inference


async def _start_inference(stack: Stack) -> Endpoint:
    import asyncio

    from llmo.inference.backends.native import NativeBackend
    from llmo.inference.engine.engine import EngineConfig, LLMEngine
    from llmo.inference.main import start
    from llmo.inference.models.loader import load_model
    from llmo.inference.settings import InferenceSettings

    loaded = await asyncio.to_thread(load_model, name=DEMO)
    backend = NativeBackend(loaded, LLMEngine(loaded, EngineConfig(num_blocks=256)), DEMO)
    settings = InferenceSettings(publish_events=True, metrics_port=-1,
                                 platform=platform(stack.nats.url, stack.data_dir / "inference"))
    running = await start(settings, port=0, http_port=0, metrics=False, backends=[backend])
    return endpoint_of(running)


def _inference_app() -> web.Application:
    from llmo.inference.http_api import OpenAIApp

    return OpenAIApp(None, PlatformSettings()).app  # type: ignore[arg-type]


def _inference_verify(stack: Stack, state: Any) -> None:
    stub = inf_grpc.InferenceServiceStub(stack.channel("inference"))
    chunks = list(stub.Generate(inf_pb.GenerateRequest(
        model=DEMO, prompt="ROMEO:\n", sampling=inf_pb.SamplingParams(max_tokens=3, ignore_eos=True)),
        metadata=auth("k-probe"), timeout=TIMEOUT))
    assert chunks[-1].usage.output_tokens == 3, chunks[-1]
    counted = stub.CountTokens(inf_pb.CountTokensRequest(model=DEMO, text="To be"), metadata=auth("k-probe"),
                               timeout=TIMEOUT)
    assert len(counted.token_ids) > 0
    _http_known_good(stack, "inference", "/v1/chat/completions", {
        "model": DEMO, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3})


INFERENCE = ServiceEntry(
    name="inference",
    descriptor=inf_pb.DESCRIPTOR.services_by_name["InferenceService"],
    start=_start_inference,
    http_app=_inference_app,
    string_hints=(DEMO, f"models/{DEMO}", "user", "assistant", "system", "ROMEO:\n"),
    http_bodies={
        "/v1/chat/completions": {"model": DEMO, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
        "/v1/completions": {"model": DEMO, "prompt": "ROMEO:\n", "max_tokens": 4},
    },
    verify=_inference_verify,
)


# ---------------------------------------------------------------- cost


async def _start_cost(stack: Stack) -> Endpoint:
    from llmo.cost.main import start
    from llmo.cost.settings import CostSettings

    data = stack.data_dir / "cost"
    data.mkdir(parents=True, exist_ok=True)
    settings = CostSettings(database_url=f"sqlite:///{data / 'cost.db'}", metrics_port=-1, ingest_batch=50,
                            ack_wait_s=5, budget_refresh_s=0.2, alert_retry_s=0.5,
                            platform=platform(stack.nats.url, data))
    running = await start(settings, port=0, metrics=False)
    return endpoint_of(running)


def usage_record(event_id: str, *, inp: int = 1000, out: int = 500, model: str = "gpt-4o-mini",
                 tenant: str = "") -> cost_pb.UsageRecord:
    return cost_pb.UsageRecord(event_id=event_id, model=model,
                               attribution=common_pb2.Attribution(tenant=tenant, application=SUITE_APP),
                               usage=common_pb2.Usage(input_tokens=inp, output_tokens=out),
                               latency=common_pb2.Latency(ttft_ms=10.0, e2e_ms=20.0))


def ledger_total(stack: Stack, key: str, application: str = "") -> tuple[int, int]:
    """(requests, cost micros) the caller's tenant has in the ledger over the longest range a report allows."""
    stub = cost_grpc.CostServiceStub(stack.channel("cost"))
    start = timestamp_pb2.Timestamp()
    start.FromDatetime(datetime.now(UTC).replace(tzinfo=None) - timedelta(days=399))  # reports span <= 400 days
    report = stub.GetCostReport(cost_pb.GetCostReportRequest(start_time=start, application=application),
                                metadata=auth(key), timeout=TIMEOUT)
    return report.total.requests, report.total.cost.micros


def _cost_seed(stack: Stack) -> dict[str, int]:
    stub = cost_grpc.CostServiceStub(stack.channel("cost"))
    records = [usage_record(f"suite-ledger-before-{i}", inp=100 * (i + 1)) for i in range(3)]
    result = stub.RecordUsage(cost_pb.RecordUsageRequest(records=records), metadata=auth("k-ledger"), timeout=TIMEOUT)
    assert [r.duplicate for r in result.results] == [False] * 3
    return {"requests": 3, "micros": sum(r.cost.micros for r in result.results)}


def _cost_verify(stack: Stack, state: dict[str, int]) -> None:
    stub = cost_grpc.CostServiceStub(stack.channel("cost"))
    assert ledger_total(stack, "k-ledger") == (state["requests"], state["micros"]), "the ledger lost accepted usage"
    after = stub.RecordUsage(cost_pb.RecordUsageRequest(records=[usage_record("suite-ledger-after")]),
                             metadata=auth("k-ledger"), timeout=TIMEOUT)
    (result,) = after.results
    assert not result.duplicate and result.cost.micros > 0
    assert ledger_total(stack, "k-ledger") == (state["requests"] + 1, state["micros"] + result.cost.micros)


COST = ServiceEntry(
    name="cost",
    descriptor=cost_pb.DESCRIPTOR.services_by_name["CostService"],
    start=_start_cost,
    string_hints=("gpt-4o-mini", "gpt-4o", "openai", "USD", "tenantA", "tenantB", "budgets/b1", "b1", "chat",
                  "H100", "2024-01-01"),
    seed=_cost_seed,
    verify=_cost_verify,
)


# ---------------------------------------------------------------- retrieval

SUITE_COLLECTION = "suite-c"


async def _start_retrieval(stack: Stack) -> Endpoint:
    from llmo.retrieval.main import start
    from llmo.retrieval.settings import RetrievalSettings

    data = stack.data_dir / "retrieval"
    data.mkdir(parents=True, exist_ok=True)
    settings = RetrievalSettings(database_url=f"sqlite:///{data / 'retrieval.db'}", metrics_port=-1,
                                 platform=platform(stack.nats.url, data))
    running = await start(settings, port=0, metrics=False)
    return endpoint_of(running)


def ingest(stack: Stack, key: str, collection: str, docs: list[ret_pb.DocumentInput]) -> list[ret_pb.DocumentProgress]:
    """The final progress of each document of one IngestDocuments stream."""
    stub = ret_grpc.RetrievalServiceStub(stack.channel("retrieval"))
    requests = [ret_pb.IngestDocumentsRequest(config=ret_pb.IngestConfig(collection=f"collections/{collection}")),
                *(ret_pb.IngestDocumentsRequest(document=d) for d in docs)]
    final: dict[int, ret_pb.DocumentProgress] = {}
    for reply in stub.IngestDocuments(iter(requests), metadata=auth(key), timeout=TIMEOUT):
        if reply.HasField("progress"):
            final[reply.progress.index] = reply.progress
    return [final[i] for i in sorted(final)]


def _retrieval_seed(stack: Stack) -> None:
    stub = ret_grpc.RetrievalServiceStub(stack.channel("retrieval"))
    for key in ("k1", "k-probe"):
        stub.CreateCollection(ret_pb.CreateCollectionRequest(collection_id=SUITE_COLLECTION),
                              metadata=auth(key), timeout=TIMEOUT)
    done = ingest(stack, "k-probe", SUITE_COLLECTION, [ret_pb.DocumentInput(
        document_id="probe-doc", text="Penguins are flightless birds of the southern hemisphere.")])
    assert [d.stage for d in done] == [ret_pb.INGEST_STAGE_INDEXED], done
    # A document under the hinted name, so generated document requests (UpdateDocumentAccess...) reach one.
    done = ingest(stack, "k1", SUITE_COLLECTION, [ret_pb.DocumentInput(document_id="d1", text="Glaciers carve valleys.")])
    assert [d.stage for d in done] == [ret_pb.INGEST_STAGE_INDEXED], done


def _retrieval_verify(stack: Stack, state: Any) -> None:
    stub = ret_grpc.RetrievalServiceStub(stack.channel("retrieval"))
    found = stub.Search(ret_pb.SearchRequest(collection=f"collections/{SUITE_COLLECTION}", query="flightless penguins"),
                        metadata=auth("k-probe"), timeout=TIMEOUT)
    assert [r.chunk.document for r in found.results] == [f"collections/{SUITE_COLLECTION}/documents/probe-doc"], found


RETRIEVAL = ServiceEntry(
    name="retrieval",
    descriptor=ret_pb.DESCRIPTOR.services_by_name["RetrievalService"],
    start=_start_retrieval,
    string_hints=(SUITE_COLLECTION, f"collections/{SUITE_COLLECTION}", f"collections/{SUITE_COLLECTION}/documents/d1",
                  "d1", "text/markdown", "text/html", "application/pdf", "user:alice", "group:eng", "year",
                  "all-MiniLM-L6-v2", "display_name", "description", "labels", "chunking"),
    seed=_retrieval_seed,
    verify=_retrieval_verify,
)


# ---------------------------------------------------------------- evaluation

SUITE_DATASET = "suite-ds"


async def _start_evaluation(stack: Stack) -> Endpoint:
    from llmo.evaluation.main import start
    from llmo.evaluation.settings import EvaluationSettings

    data = stack.data_dir / "evaluation"
    data.mkdir(parents=True, exist_ok=True)
    settings = EvaluationSettings(database_url=f"sqlite:///{data / 'evaluation.db'}", metrics_port=-1, judge_url="",
                                  target_url="", platform=platform(stack.nats.url, data))
    running = await start(settings, port=0, metrics=False)
    return endpoint_of(running)


def finished_run(stub: ev_grpc.EvaluationServiceStub, key: str, run_id: str, dataset: str) -> ev_pb.Run:
    """Create a local-metric run over `dataset` and follow it to its end."""
    stub.CreateRun(ev_pb.CreateRunRequest(run_id=run_id, run=ev_pb.Run(
        dataset=f"datasets/{dataset}", metrics=[ev_pb.MetricSpec(metric=ev_pb.METRIC_EXACT_MATCH)])),
        metadata=auth(key), timeout=TIMEOUT)
    last = None
    for reply in stub.WatchRun(ev_pb.WatchRunRequest(name=f"runs/{run_id}"), metadata=auth(key), timeout=TIMEOUT):
        last = reply.run
    assert last is not None and last.state == ev_pb.RUN_STATE_SUCCEEDED, last
    return last


def _evaluation_seed(stack: Stack) -> None:
    stub = ev_grpc.EvaluationServiceStub(stack.channel("evaluation"))
    for key in ("k1", "k-probe"):
        stub.CreateDataset(ev_pb.CreateDatasetRequest(dataset_id=SUITE_DATASET), metadata=auth(key), timeout=TIMEOUT)
        stub.CreateExample(ev_pb.CreateExampleRequest(parent=f"datasets/{SUITE_DATASET}", example_id="e1",
                                                      example=ev_pb.Example(input="2+2?", output="4", reference="4")),
                           metadata=auth(key), timeout=TIMEOUT)
    finished_run(stub, "k-probe", "suite-run", SUITE_DATASET)


def _evaluation_verify(stack: Stack, state: Any) -> None:
    stub = ev_grpc.EvaluationServiceStub(stack.channel("evaluation"))
    run = stub.GetRun(ev_pb.GetRunRequest(name="runs/suite-run"), metadata=auth("k-probe"), timeout=TIMEOUT).run
    assert run.summaries[0].mean == 1.0 and run.progress.examples_completed == 1, run
    reply = stub.Evaluate(ev_pb.EvaluateRequest(input="2+2?", output="4", reference="4", metrics=[
        ev_pb.MetricSpec(metric=ev_pb.METRIC_EXACT_MATCH)]), metadata=auth("k-probe"), timeout=TIMEOUT)
    assert reply.results[0].score == 1.0, reply


EVALUATION = ServiceEntry(
    name="evaluation",
    descriptor=ev_pb.DESCRIPTOR.services_by_name["EvaluationService"],
    start=_start_evaluation,
    string_hints=(SUITE_DATASET, f"datasets/{SUITE_DATASET}", f"datasets/{SUITE_DATASET}/examples/e1", "e1",
                  "runs/suite-run", "suite-run", "gates/g1", "rubrics/r1", "rubrics/r1@1", "feature:input_chars",
                  "faithfulness", "exact_match", "display_name", "labels", "output", "input"),
    seed=_evaluation_seed,
    verify=_evaluation_verify,
)


# ---------------------------------------------------------------- visibility

SUITE_PROJECT = "suite-proj"


async def _start_visibility(stack: Stack) -> Endpoint:
    from llmo.visibility.main import start
    from llmo.visibility.settings import VisibilitySettings

    data = stack.data_dir / "visibility"
    data.mkdir(parents=True, exist_ok=True)
    router = stack.endpoints["router"]
    # Answers go through the real router (the demo model), charged to the tenant who started the run.
    settings = VisibilitySettings(database_url=f"sqlite:///{data / 'visibility.db'}", metrics_port=-1,
                                  engine_url=f"http://127.0.0.1:{router.http_port}", engine_api_key="k-router",
                                  engine_max_tokens=16, sov_resamples=100, platform=platform(stack.nats.url, data))
    running = await start(settings, port=0, metrics=False)
    return endpoint_of(running)


def visibility_project(brand: str = "Acme") -> vis_pb.Project:
    # 127.0.0.1: a crawl of it is refused by the crawler's address policy, so suites never send traffic.
    return vis_pb.Project(brand=vis_pb.Brand(name=brand), domains=["acme.example", "127.0.0.1"],
                          competitors=[vis_pb.Competitor(name="Globex")], default_engines=[DEMO],
                          queries=[vis_pb.TrackedQuery(text="best anvil supplier")])


def finished_sov_run(stub: vis_grpc.VisibilityServiceStub, key: str, project: str, run_id: str) -> vis_pb.ShareOfVoiceRun:
    """A one-answer share-of-voice run of `project` through the router, followed to its end."""
    stub.CreateShareOfVoiceRun(vis_pb.CreateShareOfVoiceRunRequest(
        parent=f"projects/{project}", share_of_voice_run_id=run_id), metadata=auth(key), timeout=TIMEOUT)
    last = None
    for reply in stub.WatchShareOfVoiceRun(vis_pb.WatchShareOfVoiceRunRequest(
            name=f"projects/{project}/shareOfVoiceRuns/{run_id}"), metadata=auth(key), timeout=TIMEOUT):
        last = reply.share_of_voice_run
    assert last is not None and last.state == vis_pb.JOB_STATE_SUCCEEDED, last
    return last


def _visibility_seed(stack: Stack) -> None:
    stub = vis_grpc.VisibilityServiceStub(stack.channel("visibility"))
    for key in ("k1", "k-probe"):
        stub.CreateProject(vis_pb.CreateProjectRequest(project_id=SUITE_PROJECT, project=visibility_project()),
                           metadata=auth(key), timeout=TIMEOUT)
    finished_sov_run(stub, "k-probe", SUITE_PROJECT, "suite-run")


def _visibility_verify(stack: Stack, state: Any) -> None:
    stub = vis_grpc.VisibilityServiceStub(stack.channel("visibility"))
    name = f"projects/{SUITE_PROJECT}"
    run = stub.GetShareOfVoiceRun(vis_pb.GetShareOfVoiceRunRequest(name=f"{name}/shareOfVoiceRuns/suite-run"),
                                  metadata=auth("k-probe"), timeout=TIMEOUT).share_of_voice_run
    assert run.state == vis_pb.JOB_STATE_SUCCEEDED and run.progress.answers_completed == 1, run
    page = stub.ScorePage(vis_pb.ScorePageRequest(html="<html><head><title>Anvils</title></head><body><h1>Anvils"
                                                       "</h1><p>We make anvils.</p></body></html>"),
                          metadata=auth("k-probe"), timeout=TIMEOUT).page
    assert 0 <= page.score.overall <= 100 and page.score.findings, page


VISIBILITY = ServiceEntry(
    name="visibility",
    descriptor=vis_pb.DESCRIPTOR.services_by_name["VisibilityService"],
    start=_start_visibility,
    string_hints=(SUITE_PROJECT, f"projects/{SUITE_PROJECT}", f"projects/{SUITE_PROJECT}/crawls/c1",
                  f"projects/{SUITE_PROJECT}/shareOfVoiceRuns/suite-run",
                  f"projects/{SUITE_PROJECT}/crawls/c1/pages/0123456789abcdef", "acme.example",
                  "https://acme.example/", "https://chatgpt.com/", DEMO, "Acme", "display_name", "brand",
                  "queries", "labels"),
    seed=_visibility_seed,
    verify=_visibility_verify,
)


# ---------------------------------------------------------------- router

PORTFOLIO = """
providers:
  inference:
    kind: openai
    base_url: http://127.0.0.1:{port}/v1
    api_key_env: {key_env}
    max_retries: 0
    first_token_timeout_s: 60
    idle_timeout_s: 30
    timeout_s: 120
models:
  - name: {model}
    provider: inference
    input_price_micros_per_mtok: 50000
    output_price_micros_per_mtok: 100000
    context_window: 512
    max_output_tokens: 16
    quality: 0.3
    fallbacks: [demo-strong]
  - name: demo-strong
    provider: inference
    provider_model: {model}
    input_price_micros_per_mtok: 500000
    output_price_micros_per_mtok: 1000000
    context_window: 512
    max_output_tokens: 16
    capabilities: [json]
    quality: 0.8
routing:
  default_model: {model}
"""


async def _start_router(stack: Stack) -> Endpoint:
    from llmo.router.main import start
    from llmo.router.settings import RouterSettings

    data = stack.data_dir / "router"
    data.mkdir(parents=True, exist_ok=True)
    pf = data / "portfolio.yaml"
    pf.write_text(PORTFOLIO.format(port=stack.endpoints["inference"].http_port, key_env=UPSTREAM_KEY_ENV, model=DEMO))
    settings = RouterSettings(database_url=f"sqlite:///{data / 'router.db'}", metrics_port=-1,
                              portfolio_path=str(pf), portfolio_reload_s=1.0,
                              cost_target=stack.endpoints["cost"].grpc_address, cost_api_key="k-router",
                              budget_timeout_s=5.0, platform=platform(stack.nats.url, data))
    running = await start(settings, port=0, http_port=0, metrics=False)
    return endpoint_of(running)


def _router_app() -> web.Application:
    from llmo.router.http_api import OpenAIFront

    return OpenAIFront(None, PlatformSettings()).app()  # type: ignore[arg-type]


def _router_seed(stack: Stack) -> None:
    stub = router_grpc.RouterServiceStub(stack.channel("router"))
    stub.CreatePromptTemplate(router_pb.CreatePromptTemplateRequest(prompt_template_id="probe-tpl"),
                              metadata=auth("k-probe"), timeout=TIMEOUT)
    stub.CreatePromptVersion(router_pb.CreatePromptVersionRequest(parent="promptTemplates/probe-tpl",
                                                                  body="Be brief.", labels=["production"]),
                             metadata=auth("k-probe"), timeout=TIMEOUT)


def _router_verify(stack: Stack, state: Any) -> None:
    stub = router_grpc.RouterServiceStub(stack.channel("router"))
    got = stub.GetPromptTemplate(router_pb.GetPromptTemplateRequest(name="promptTemplates/probe-tpl"),
                                 metadata=auth("k-probe"), timeout=TIMEOUT).prompt_template
    assert got.latest_version == 1 and dict(got.labels) == {"production": 1}, got
    out = list(stub.Complete(router_pb.CompleteRequest(
        messages=[router_pb.ChatMessage(role="user", content="Hello there")], max_tokens=3, skip_cache=True,
        prompt=router_pb.PromptRef(template="promptTemplates/probe-tpl")),
        metadata=auth("k-probe"), timeout=TIMEOUT))
    assert out[-1].finish_reason and out[-1].usage.output_tokens > 0, out[-1]
    _http_known_good(stack, "router", "/v1/chat/completions", {
        "model": DEMO, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3})


ROUTER = ServiceEntry(
    name="router",
    descriptor=router_pb.DESCRIPTOR.services_by_name["RouterService"],
    start=_start_router,
    http_app=_router_app,
    string_hints=(DEMO, "demo-strong", "user", "assistant", "system", "json", "production", "promptTemplates/probe-tpl",
                  "promptTemplates/suite", "suite", "experiments/suite", "{{name}}"),
    http_bodies={
        "/v1/chat/completions": {"model": DEMO, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
    },
    seed=_router_seed,
    verify=_router_verify,
)


def _http_known_good(stack: Stack, service: str, path: str, body: dict[str, Any]) -> None:
    from tests.suites.httpclient import send_json

    status, _, payload = send_json(stack.endpoints[service].http_port or 0, "POST", path, body, key="k-probe")
    assert status == 200, (status, payload[:500])


# Start order matters: the router calls inference (HTTP) and cost (budgets); visibility asks the router.
SERVICES: list[ServiceEntry] = [INFERENCE, COST, ROUTER, RETRIEVAL, EVALUATION, VISIBILITY]
BY_NAME = {entry.name: entry for entry in SERVICES}


# ---------------------------------------------------------------- known failures
#
# (service, case, family) -> why it fails today. `case` is a gRPC method name, an HTTP
# route label ("POST /v1/chat/completions") or a tenancy probe name; `*` matches every
# gRPC method of the service. Remove an entry once its fix lands (strict xfail fails on a pass).

KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}


def known_failure(service: str, case: str, family: str) -> str | None:
    """The known failure of one case; `*` stands for every gRPC method (never an HTTP route)."""
    if (service, case, family) in KNOWN_FAILURES:
        return KNOWN_FAILURES[(service, case, family)]
    return None if " " in case else KNOWN_FAILURES.get((service, "*", family))
