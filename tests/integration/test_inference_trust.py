"""Who an inference is billed to, and under which request id, over real HTTP and real gRPC with API keys
and a real nats-server: a service key (the router's) acts for an end tenant with its own request id; a
tenant key may neither act for another tenant nor choose the request id (the ledger's dedupe key)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio

from llmo.core.errors import error_info
from llmo.core.settings import PlatformSettings
from llmo.inference.backends.native import NativeBackend
from llmo.inference.engine.engine import EngineConfig, LLMEngine
from llmo.inference.main import RunningInference, start
from llmo.inference.models.loader import LoadedModel, load_model
from llmo.inference.settings import InferenceSettings
from llmo.protos.events.v1 import events_pb2
from llmo.protos.inference.v1 import inference_service_pb2 as pb
from llmo.protos.inference.v1 import inference_service_pb2_grpc as pb_grpc

DEMO = "llmo-demo"
KEYS = {"k1": "tenantA", "k2": "tenantB", "ksvc": "router"}
SUBJECT = "llmo.inference.v1.completed"
CHAT = {"model": DEMO, "messages": [{"role": "user", "content": "Speak."}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_model(name=DEMO)


@pytest_asyncio.fixture
async def running(nats_server: Any, demo: LoadedModel, tmp_path: Path) -> AsyncIterator[RunningInference]:
    platform = PlatformSettings(nats_url=nats_server.url, api_keys=KEYS, admin_tenants=frozenset({"router"}),
                                data_dir=tmp_path)
    settings = InferenceSettings(publish_events=True, metrics_port=-1, platform=platform)
    backend = NativeBackend(demo, LLMEngine(demo, EngineConfig(num_blocks=64)), DEMO)
    server = await start(settings, port=0, http_port=0, metrics=False, backends=[backend])
    yield server
    await server.stop()


async def _events(running: RunningInference, nats_url: str, count: int) -> list[events_pb2.InferenceCompleted]:
    import nats

    await running.service.drain()
    assert running.publisher is not None and await running.publisher.flush(10)  # out of the outbox
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().pull_subscribe(SUBJECT, durable="trust-test")
        got: list[events_pb2.InferenceCompleted] = []
        while len(got) < count:
            for msg in await sub.fetch(count - len(got), timeout=10):
                got.append(events_pb2.InferenceCompleted.FromString(msg.data))
                await msg.ack()
        return got
    finally:
        await nc.close()


async def _chat(running: RunningInference, key: str, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(f"http://127.0.0.1:{running.http_port}/v1/chat/completions", json=CHAT,
                               headers={"authorization": f"Bearer {key}", **headers}, timeout=60)


async def test_http_service_key_bills_the_end_tenant_under_its_own_request_id(
        running: RunningInference, nats_server: Any) -> None:
    response = await _chat(running, "ksvc", **{"x-llmo-tenant": "tenantB", "x-request-id": "router-req-1"})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "router-req-1"
    (event,) = await _events(running, nats_server.url, 1)
    assert event.attribution.tenant == "tenantB"
    assert event.request_id == "router-req-1"
    assert event.usage.output_tokens == 2


async def test_http_tenant_key_may_not_act_for_another_tenant(running: RunningInference) -> None:
    response = await _chat(running, "k1", **{"x-llmo-tenant": "tenantB"})
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "ON_BEHALF_FORBIDDEN" and error["type"] == "permission_error"
    assert error["request_id"] == response.headers["x-request-id"]


async def test_http_tenant_key_does_not_choose_the_request_id(running: RunningInference, nats_server: Any) -> None:
    answered = []
    for _ in range(3):
        response = await _chat(running, "k2", **{"x-request-id": "reuse-1"})
        assert response.status_code == 200, response.text
        answered.append(response.headers["x-request-id"])
    assert len(set(answered)) == 3 and "reuse-1" not in answered
    events = await _events(running, nats_server.url, 3)
    assert sorted(e.request_id for e in events) == sorted(answered)
    assert len({e.event_id for e in events}) == 3
    assert {e.attribution.tenant for e in events} == {"tenantB"}


async def _generate(running: RunningInference, key: str, request: pb.GenerateRequest,
                    **metadata: str) -> list[pb.GenerateResponse]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        call = pb_grpc.InferenceServiceStub(channel).Generate(
            request, timeout=60, metadata=[("authorization", f"Bearer {key}"), *metadata.items()])
        return [chunk async for chunk in call]


GENERATE = pb.GenerateRequest(model=DEMO, prompt="ROMEO:\n", sampling=pb.SamplingParams(max_tokens=2, ignore_eos=True))


async def test_grpc_service_key_bills_the_end_tenant_under_its_own_request_id(
        running: RunningInference, nats_server: Any) -> None:
    chunks = await _generate(running, "ksvc", GENERATE,
                             **{"x-llmo-tenant": "tenantB", "x-request-id": "router-req-2"})
    assert {c.request_id for c in chunks} == {"router-req-2"}
    (event,) = await _events(running, nats_server.url, 1)
    assert (event.attribution.tenant, event.request_id) == ("tenantB", "router-req-2")


async def test_grpc_tenant_key_may_not_act_for_another_tenant(running: RunningInference) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _generate(running, "k1", GENERATE, **{"x-llmo-tenant": "tenantB"})
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    detail = error_info(info.value)
    assert detail is not None and detail.reason == "ON_BEHALF_FORBIDDEN"


async def test_grpc_tenant_key_does_not_choose_the_request_id(running: RunningInference, nats_server: Any) -> None:
    answered = []
    for i in range(3):
        # Neither the metadata id nor the body's request_id is trusted from a tenant key.
        request = pb.GenerateRequest()
        request.CopyFrom(GENERATE)
        request.request_id = "reuse-1" if i % 2 else ""
        chunks = await _generate(running, "k2", request, **{"x-request-id": "reuse-1"})
        (request_id,) = {c.request_id for c in chunks}
        answered.append(request_id)
    assert len(set(answered)) == 3 and "reuse-1" not in answered
    events = await _events(running, nats_server.url, 3)
    assert sorted(e.request_id for e in events) == sorted(answered)
    assert len({e.event_id for e in events}) == 3
    assert {e.attribution.tenant for e in events} == {"tenantB"}


async def test_a_service_may_reuse_its_request_id_while_the_first_call_runs(running: RunningInference) -> None:
    headers = {"authorization": "Bearer ksvc", "x-llmo-tenant": "tenantB", "x-request-id": "router-dup"}
    url = f"http://127.0.0.1:{running.http_port}/v1/chat/completions"
    long = {**CHAT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient() as http, http.stream("POST", url, json=long, headers=headers,
                                                        timeout=60) as first:
        assert first.status_code == 200
        async for line in first.aiter_lines():
            if line.startswith("data:"):
                break  # the first call is in the engine now
        second = await http.post(url, json=CHAT, headers=headers, timeout=60)
        assert second.status_code == 200, second.text
        assert second.headers["x-request-id"] == "router-dup"
