"""Hostile and malformed requests to the inference service over real HTTP and real gRPC: every one gets a
4xx (INVALID_ARGUMENT) naming the offending request field, never a 500 / INTERNAL, and the service keeps
serving. HTTP errors are the one JSON body with a request id."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
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
from llmo.protos.inference.v1 import inference_service_pb2 as pb
from llmo.protos.inference.v1 import inference_service_pb2_grpc as pb_grpc

DEMO = "llmo-demo"
VOCAB = 2048
MAX_BODY = 64 * 1024
MESSAGES = [{"role": "user", "content": "Speak."}]


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_model(name=DEMO)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(demo: LoadedModel) -> AsyncIterator[RunningInference]:
    settings = InferenceSettings(publish_events=False, metrics_port=-1, platform=PlatformSettings(),
                                 http_max_body_bytes=MAX_BODY)
    backend = NativeBackend(demo, LLMEngine(demo, EngineConfig(num_blocks=64)), DEMO)
    server = await start(settings, port=0, http_port=0, metrics=False, backends=[backend])
    yield server
    await server.stop()


def _chat(**fields: Any) -> bytes:
    return json.dumps({"model": DEMO, "messages": MESSAGES, "max_tokens": 2, **fields}).encode()


# (path, raw body, HTTP status, error code, param)
HTTP_CASES = [
    # lone UTF-16 surrogate: no tokenizer can encode it
    ("chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800x"}]}', 400, "INVALID_UNICODE",
     "messages"),
    ("chat/completions", b"[" * 5000 + b"]" * 5000, 400, "INVALID_JSON", None),
    ("chat/completions", b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "INVALID_JSON", None),
    ("chat/completions", _chat(stream=True, stream_options="x"), 400, "INVALID_SAMPLING_PARAMS",
     "stream_options"),
    ("chat/completions", _chat(stream=True, stream_options={"include_usage": "yes"}), 400,
     "INVALID_SAMPLING_PARAMS", "stream_options"),
    ("chat/completions", _chat(stream="yes"), 400, "INVALID_SAMPLING_PARAMS", "stream"),
    # Python's json writes these as the bare tokens Infinity / NaN, which JSON parsers accept
    ("chat/completions", _chat(temperature=float("inf")), 400, "INVALID_SAMPLING_PARAMS", "temperature"),
    ("chat/completions", _chat(temperature=float("nan")), 400, "INVALID_SAMPLING_PARAMS", "temperature"),
    ("chat/completions", _chat(top_p=float("nan")), 400, "INVALID_SAMPLING_PARAMS", "top_p"),
    ("chat/completions", _chat(repetition_penalty=float("inf")), 400, "INVALID_SAMPLING_PARAMS",
     "repetition_penalty"),
    ("chat/completions", _chat(stop_token_ids=[-1, 1e9]), 400, "INVALID_SAMPLING_PARAMS", "stop_token_ids"),
    ("chat/completions", _chat(stop_token_ids=[-1]), 400, "INVALID_SAMPLING_PARAMS", "stop_token_ids"),
    ("chat/completions", _chat(stop_token_ids=[VOCAB]), 400, "INVALID_SAMPLING_PARAMS", "stop_token_ids"),
    ("chat/completions", _chat(top_k=2**31 - 1), 400, "INVALID_SAMPLING_PARAMS", "top_k"),
    ("chat/completions", _chat(top_k=VOCAB + 1), 400, "INVALID_SAMPLING_PARAMS", "top_k"),
    # used to be param "Overflow" (torch's seed overflow) and "at" ("at most 16 stop strings")
    ("chat/completions", _chat(seed=2**70), 400, "INVALID_SAMPLING_PARAMS", "seed"),
    ("chat/completions", _chat(stop=[str(i) for i in range(17)]), 400, "INVALID_SAMPLING_PARAMS", "stop"),
    ("chat/completions", _chat(stop=5), 400, "INVALID_SAMPLING_PARAMS", "stop"),
    ("chat/completions", _chat(stop=["x" * 1000]), 400, "INVALID_SAMPLING_PARAMS", "stop"),
    ("chat/completions", _chat(max_tokens=True), 400, "INVALID_SAMPLING_PARAMS", "max_tokens"),
    ("chat/completions", _chat(max_tokens=10**30), 400, "INVALID_SAMPLING_PARAMS", "max_tokens"),
    ("chat/completions", _chat(max_completion_tokens=-1), 400, "INVALID_SAMPLING_PARAMS", "max_completion_tokens"),
    ("chat/completions", _chat(logprobs=True, top_logprobs=99), 400, "INVALID_SAMPLING_PARAMS", "top_logprobs"),
    ("chat/completions", _chat(n=1000), 400, "INVALID_SAMPLING_PARAMS", "n"),
    ("chat/completions", _chat(ignore_eos="false"), 400, "INVALID_SAMPLING_PARAMS", "ignore_eos"),
    ("chat/completions", _chat(priority=2**40), 400, "INVALID_PRIORITY", "priority"),
    ("chat/completions", _chat(model={"a": 1}), 400, "INVALID_SAMPLING_PARAMS", "model"),
    ("chat/completions", _chat(user="u" * 1000), 400, "INVALID_ATTRIBUTION", "user"),
    ("chat/completions", _chat(tools=[{"type": "function"}]), 400, "UNSUPPORTED_PARAMETER", "tools"),
    ("chat/completions", _chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), 400,
     "PROMPT_MISSING", "messages"),
    ("chat/completions", _chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "PROMPT_MISSING", "messages"),
    ("completions", json.dumps({"prompt": [1, True, 2]}).encode(), 400, "PROMPT_MISSING", "prompt"),
    ("completions", json.dumps({"prompt": [1, VOCAB]}).encode(), 400, "INVALID_TOKEN_ID", "prompt_token_ids"),
    ("completions", json.dumps({"prompt": "hi", "echo": True, "logprobs": 50}).encode(), 400,
     "INVALID_SAMPLING_PARAMS", "logprobs"),
    ("completions", b"\xff\xfe", 400, "INVALID_JSON", None),
    ("completions", b'{"prompt": "' + b"x" * MAX_BODY + b'"}', 413, "BODY_TOO_LARGE", None),
]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("path", "body", "status", "code", "param"), HTTP_CASES)
async def test_http_bad_input_is_a_json_4xx_naming_the_param(running: RunningInference, path: str, body: bytes,
                                                              status: int, code: str, param: str | None) -> None:
    base = f"http://127.0.0.1:{running.http_port}/v1"
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{base}/{path}", content=body, headers={"content-type": "application/json"},
                                   timeout=60)
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "code", "param", "request_id"}
        assert (error["code"], error["param"]) == (code, param)
        assert error["request_id"] and error["request_id"] == response.headers["x-request-id"]
        assert len(error["message"]) < 300  # never echoes the unbounded input
        ok = await http.post(f"{base}/chat/completions", content=_chat(), timeout=60)
        assert ok.status_code == 200, ok.text


@pytest.mark.asyncio(loop_scope="module")
async def test_text_far_over_the_context_is_refused_without_tokenizing_it(running: RunningInference) -> None:
    prompt = "To be or not to be. " * 3000  # 60,000 characters: at least 1,071 tokens, the context is 512
    base = f"http://127.0.0.1:{running.http_port}/v1"
    async with httpx.AsyncClient() as http:
        for path, body in (("completions", {"prompt": prompt}),
                           ("chat/completions", {"messages": [{"role": "user", "content": prompt}]})):
            response = await http.post(f"{base}/{path}", json=body, timeout=60)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["code"] == "CONTEXT_LENGTH_EXCEEDED"
            assert "60000 characters, at least" in error["message"]
    # Text that may fit is tokenized and measured exactly.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(pb.GenerateRequest(prompt="To be. " * 200), timeout=60):
                pass
        detail = error_info(info.value)
        assert detail is not None and detail.reason == "CONTEXT_LENGTH_EXCEEDED"
        assert "characters" not in (info.value.details() or "")


GRPC_CASES = [
    (pb.SamplingParams(temperature=float("inf")), "temperature"),
    (pb.SamplingParams(temperature=float("nan")), "temperature"),
    (pb.SamplingParams(repetition_penalty=float("-inf")), "repetition_penalty"),
    (pb.SamplingParams(stop_token_ids=[-1]), "stop_token_ids"),
    (pb.SamplingParams(stop_token_ids=[VOCAB]), "stop_token_ids"),
    (pb.SamplingParams(top_k=2**31 - 1), "top_k"),
    (pb.SamplingParams(stop=[str(i) for i in range(17)]), "stop"),
    (pb.SamplingParams(n=17), "n"),
]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("sampling", "field"), GRPC_CASES)
async def test_grpc_bad_sampling_is_invalid_argument_naming_the_field(running: RunningInference,
                                                                     sampling: pb.SamplingParams,
                                                                     field: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(pb.GenerateRequest(prompt="hi", sampling=sampling), timeout=60):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        detail = error_info(info.value)
        assert detail is not None
        assert (detail.reason, detail.metadata["field"]) == ("INVALID_SAMPLING_PARAMS", field)
        ok = [c async for c in stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(
            max_tokens=2)), timeout=60)]
        assert ok[-1].usage.output_tokens >= 1
