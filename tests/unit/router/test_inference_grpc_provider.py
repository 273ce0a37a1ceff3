"""The llmo_inference provider against a real gRPC InferenceService on a socket."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from sqlalchemy.engine import Engine

from llmo.protos.common.v1 import common_pb2
from llmo.protos.inference.v1 import inference_service_pb2 as ipb
from llmo.protos.inference.v1 import inference_service_pb2_grpc as ipb_grpc
from llmo.router.sampling import Sampling

from .gw_helpers import collect, load, make_gateway, user


class Inference(ipb_grpc.InferenceServiceServicer):
    def __init__(self) -> None:
        self.fail = False
        self.reject = False
        self.seen: list[ipb.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []

    async def Generate(self, request: ipb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[ipb.GenerateResponse]:  # type: ignore[override]
        self.seen.append(request)
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})
        if self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "engine down")
        if self.reject:
            from llmo.core.errors import STATUS_DETAILS_KEY, invalid_argument

            refusal = invalid_argument("INVALID_SAMPLING_PARAMS", "temperature must be in [0, 2]", field="temperature")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal.message, trailing_metadata=(
                (STATUS_DETAILS_KEY, refusal.to_status("llmo.inference").SerializeToString()),))
        for i in range(3):
            yield ipb.GenerateResponse(model=request.model, choices=[ipb.ChoiceDelta(text=f"t{i} ")])
        yield ipb.GenerateResponse(
            model=request.model,
            choices=[ipb.ChoiceDelta(finish_reason=ipb.FINISH_REASON_STOP)],
            usage=common_pb2.Usage(input_tokens=7, output_tokens=3),
        )


@pytest.fixture
async def inference() -> AsyncIterator[tuple[Inference, int]]:
    server = grpc.aio.server()
    servicer = Inference()
    ipb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, port
    await server.stop(0)


def portfolio(port: int, backup_url: str) -> str:
    return f"""
providers:
  inference:
    kind: llmo_inference
    target: 127.0.0.1:{port}
    api_key_env: TEST_ROUTER_INFERENCE_KEY
    max_retries: 0
    breaker_failures: 2
  http:
    kind: openai
    base_url: {backup_url}
models:
  - name: local
    provider: inference
    provider_model: llmo-demo
    input_price_micros_per_mtok: 1000000
    output_price_micros_per_mtok: 1000000
    context_window: 2048
    fallbacks: [backup]
  - name: backup
    provider: http
    input_price_micros_per_mtok: 1
    output_price_micros_per_mtok: 1
    context_window: 2048
"""


async def test_streams_from_the_inference_service(engine: Engine, inference: tuple[Inference, int], backend) -> None:  # type: ignore[no-untyped-def]
    servicer, port = inference
    gw = make_gateway(engine, load(portfolio(port, backend.base_url)))
    _, text, fin = await collect(gw, user("hello", model="local", max_tokens=5, sampling=Sampling(temperature=0.0)))
    assert text == "t0 t1 t2 " and fin.finish_reason == "stop" and fin.model == "local"
    assert (fin.usage.prompt_tokens, fin.usage.completion_tokens) == (7, 3)
    assert fin.cost_micros == 10  # 10 tokens at 1 USD per million
    sent = servicer.seen[-1]
    assert sent.model == "llmo-demo" and sent.messages[0].content == "hello" and sent.sampling.max_tokens == 5
    await gw.close()


async def test_inference_outage_falls_back(engine: Engine, inference: tuple[Inference, int], backend) -> None:  # type: ignore[no-untyped-def]
    servicer, port = inference
    servicer.fail = True
    gw = make_gateway(engine, load(portfolio(port, backend.base_url)))
    _, text, fin = await collect(gw, user("hello", model="local"))
    assert fin.model == "backup" and text.startswith("backup-w0")
    await gw.close()


async def test_calls_carry_the_end_tenant_and_the_routers_own_request_id(  # type: ignore[no-untyped-def]
    engine: Engine, inference: tuple[Inference, int], backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_ROUTER_INFERENCE_KEY", "router-key")
    servicer, port = inference
    gw = make_gateway(engine, load(portfolio(port, backend.base_url)))
    started, _, _ = await collect(
        gw, user("hello", tenant="tenant-b", model="local", user="u7", application="app1", sampling=Sampling(seed=5, top_k=3))
    )
    md = servicer.metadata[-1]
    assert md["authorization"] == "Bearer router-key"
    assert md["x-llmo-tenant"] == "tenant-b" and md["x-request-id"] == started.request_id
    sent = servicer.seen[-1]
    assert (sent.attribution.user, sent.attribution.application) == ("u7", "app1")
    assert (sent.sampling.seed, sent.sampling.top_k) == (5, 3)
    await gw.close()


async def test_requests_the_inference_service_refuses_never_open_its_breaker(  # type: ignore[no-untyped-def]
    engine: Engine, inference: tuple[Inference, int], backend
) -> None:
    from llmo.core.errors import ServiceError

    servicer, port = inference
    servicer.reject = True
    gw = make_gateway(engine, load(portfolio(port, backend.base_url)))
    for _ in range(4):  # twice the breaker's limit
        with pytest.raises(ServiceError) as err:
            await collect(gw, user("hello", model="local"))
        assert err.value.reason == "UPSTREAM_REJECTED_REQUEST"
        assert err.value.metadata["field"] == "temperature"  # the field inference named
    assert backend.calls == {}  # a refused request is not sent down the fallback chain either
    servicer.reject = False
    _, text, fin = await collect(gw, user("hello", tenant="t2", model="local"))
    assert fin.model == "local" and text == "t0 t1 t2 "
    assert gw.breakers.states()["inference"] == "closed"
    await gw.close()
