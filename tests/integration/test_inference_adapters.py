"""LoRA adapters on the inference service over real sockets: preloaded from settings, hot-loaded and
unloaded over gRPC by admins only, selected by `model` over HTTP, listed on /v1/models and ListModels,
and named in the usage event (model = adapter, base_model = the model it runs on)."""

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
from llmo.inference.main import RunningInference, start
from llmo.inference.models.loader import LoadedModel, load_model
from llmo.inference.settings import InferenceSettings
from llmo.protos.events.v1 import events_pb2
from llmo.protos.inference.v1 import inference_service_pb2 as pb
from llmo.protos.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.unit.inference.test_lora_serving import write_adapter

DEMO = "llmo-demo"
KEYS = {"kadmin": "router", "ktenant": "tenantA"}
ADMIN = (("authorization", "Bearer kadmin"),)
TENANT = (("authorization", "Bearer ktenant"),)


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_model(name=DEMO)


@pytest_asyncio.fixture
async def running(nats_server: Any, demo: LoadedModel, tmp_path: Path) -> AsyncIterator[RunningInference]:
    write_adapter(tmp_path / "adapters" / "math", demo, rank=8, seed=4)
    write_adapter(tmp_path / "adapters" / "legal", demo, rank=4, seed=5, targets=("o_proj", "up_proj"))
    write_adapter(tmp_path / "outside", demo, seed=6)
    platform = PlatformSettings(nats_url=nats_server.url, api_keys=KEYS, admin_tenants=frozenset({"router"}),
                                data_dir=tmp_path)
    settings = InferenceSettings(publish_events=True, metrics_port=-1, platform=platform, num_kv_blocks=64,
                                 max_adapters=2, adapters={"math": str(tmp_path / "adapters" / "math")})
    server = await start(settings, port=0, http_port=0, metrics=False)
    yield server
    await server.stop()


async def _completion(server: RunningInference, model: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(
            f"http://127.0.0.1:{server.http_port}/v1/completions",
            json={"model": model, "prompt": "ROMEO:\n", "max_tokens": 8, "temperature": 0, "ignore_eos": True},
            headers={"authorization": "Bearer ktenant"}, timeout=60,
        )


async def _expect(call: Any, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    detail = error_info(info.value)
    assert detail is not None and detail.reason == reason, detail


async def test_adapters_load_serve_list_bill_and_unload(running: RunningInference, tmp_path: Path,
                                                        nats_server: Any) -> None:
    import nats

    base = await _completion(running, DEMO)
    math = await _completion(running, "math")
    assert base.status_code == 200 and math.status_code == 200, math.text
    assert math.json()["model"] == "math"
    assert math.json()["choices"][0]["text"] != base.json()["choices"][0]["text"]

    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        # tenants cannot load or unload; paths outside the adapter directory are refused
        await _expect(stub.LoadAdapter(pb.LoadAdapterRequest(name="legal", path="legal"), metadata=TENANT),
                      grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
        await _expect(stub.UnloadAdapter(pb.UnloadAdapterRequest(name="math"), metadata=TENANT),
                      grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
        await _expect(stub.LoadAdapter(pb.LoadAdapterRequest(name="x", path="../outside"), metadata=ADMIN),
                      grpc.StatusCode.PERMISSION_DENIED, "ADAPTER_PATH_FORBIDDEN")
        await _expect(stub.LoadAdapter(pb.LoadAdapterRequest(name="x", path="missing"), metadata=ADMIN),
                      grpc.StatusCode.INVALID_ARGUMENT, "ADAPTER_INVALID")
        await _expect(stub.LoadAdapter(pb.LoadAdapterRequest(name=DEMO, path="legal"), metadata=ADMIN),
                      grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ADAPTER_NAME")
        await _expect(stub.LoadAdapter(pb.LoadAdapterRequest(name="math", path="legal"), metadata=ADMIN),
                      grpc.StatusCode.ALREADY_EXISTS, "ADAPTER_EXISTS")
        await _expect(stub.LoadAdapter(pb.LoadAdapterRequest(name="x", path="legal", base_model="nope"),
                                       metadata=ADMIN), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")

        loaded = (await stub.LoadAdapter(pb.LoadAdapterRequest(name="legal", path="legal"), metadata=ADMIN)).adapter
        assert (loaded.name, loaded.base_model, loaded.rank) == ("legal", DEMO, 4)
        assert sorted(loaded.target_modules) == ["o_proj", "up_proj"] and loaded.size_bytes > 0
        await _expect(stub.LoadAdapter(pb.LoadAdapterRequest(name="third", path="legal"), metadata=ADMIN),
                      grpc.StatusCode.RESOURCE_EXHAUSTED, "ADAPTER_LIMIT")

        listed = await stub.ListAdapters(pb.ListAdaptersRequest(), metadata=TENANT)
        assert [a.name for a in listed.adapters] == ["legal", "math"] and listed.free_slots[DEMO] == 0
        first = await stub.ListAdapters(pb.ListAdaptersRequest(page_size=1), metadata=TENANT)
        rest = await stub.ListAdapters(pb.ListAdaptersRequest(page_size=1, page_token=first.next_page_token),
                                       metadata=TENANT)
        assert [a.name for a in [*first.adapters, *rest.adapters]] == ["legal", "math"] and not rest.next_page_token
        models = await stub.ListModels(pb.ListModelsRequest(), metadata=TENANT)
        by_id = {m.model_id: m for m in models.models}
        assert set(by_id) == {DEMO, "legal", "math"} and by_id["legal"].base_model == DEMO
        assert (await stub.GetModel(pb.GetModelRequest(name="models/math"), metadata=TENANT)).model.base_model == DEMO

        chunks = [c async for c in stub.Generate(pb.GenerateRequest(
            model="legal", prompt="ROMEO:\n", sampling=pb.SamplingParams(max_tokens=4, temperature=0)),
            metadata=TENANT)]
        assert chunks[-1].model == "legal" and chunks[-1].usage.output_tokens >= 1

        async with httpx.AsyncClient() as http:
            listing = (await http.get(f"http://127.0.0.1:{running.http_port}/v1/models",
                                      headers={"authorization": "Bearer ktenant"})).json()
        parents = {m["id"]: m.get("parent") for m in listing["data"]}
        assert parents == {DEMO: None, "legal": DEMO, "math": DEMO}

        unloaded = await stub.UnloadAdapter(pb.UnloadAdapterRequest(name="math"), metadata=ADMIN)
        assert unloaded.adapter.name == "math"
        await _expect(stub.UnloadAdapter(pb.UnloadAdapterRequest(name="math"), metadata=ADMIN),
                      grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND")
    gone = await _completion(running, "math")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "MODEL_NOT_FOUND"

    await running.service.drain()
    assert running.publisher is not None and await running.publisher.flush(10)
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.jetstream().pull_subscribe("llmo.inference.v1.completed", durable="adapter-test")
        events = [events_pb2.InferenceCompleted.FromString(m.data) for m in await sub.fetch(3, timeout=10)]
    finally:
        await nc.close()
    served = sorted((e.model, e.base_model, e.attribution.tenant) for e in events)
    assert served == [("legal", DEMO, "tenantA"), (DEMO, "", "tenantA"), ("math", DEMO, "tenantA")]
