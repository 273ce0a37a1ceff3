from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from llmo.core.settings import PlatformSettings
from llmo.inference.backends.native import NativeBackend
from llmo.inference.main import build_backend, serve
from llmo.inference.settings import InferenceSettings
from llmo.protos.inference.v1 import inference_service_pb2 as pb
from llmo.protos.inference.v1 import inference_service_pb2_grpc as pb_grpc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMO_INFERENCE_MAX_NUM_SEQS", "3")
    monkeypatch.setenv("LLMO_INFERENCE_QUANTIZATION", "int8")
    settings = InferenceSettings()
    assert settings.max_num_seqs == 3 and settings.quantization == "int8"
    assert settings.resolved_grpc_port() == 50052 and settings.resolved_http_port() == 8000
    assert InferenceSettings(http_port=-1).resolved_http_port() is None


def test_build_backend_native_and_openai_errors() -> None:
    backend = build_backend(InferenceSettings(quantization="int8", num_kv_blocks=32, device="cpu"))
    assert isinstance(backend, NativeBackend)
    info = backend.info()
    assert (info.quantization, info.kv_blocks_total, info.model_id) == ("int8", 32, "llmo-demo")
    with pytest.raises(ValueError, match="needs a base URL"):
        build_backend(InferenceSettings(backend="openai"))


async def test_serve_runs_until_cancelled() -> None:
    port = _free_port()
    settings = InferenceSettings(grpc_port=port, http_port=-1, metrics_port=-1, publish_events=False,
                                 num_kv_blocks=32, platform=PlatformSettings())
    task = asyncio.create_task(serve(settings))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            models = await stub.ListModels(pb.ListModelsRequest(), wait_for_ready=True, timeout=60)
            assert [m.model_id for m in models.models] == ["llmo-demo"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
