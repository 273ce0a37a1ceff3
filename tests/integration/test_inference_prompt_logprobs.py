"""Prompt logprobs over gRPC and OpenAI `echo` over a real HTTP socket, checked against a dense forward pass."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
import torch

from llmo.core.errors import error_info
from llmo.core.settings import PlatformSettings
from llmo.inference.backends.base import Backend
from llmo.inference.backends.native import NativeBackend
from llmo.inference.backends.openai_backend import OpenAIBackend
from llmo.inference.engine.engine import EngineConfig, LLMEngine
from llmo.inference.main import RunningInference, start
from llmo.inference.models.loader import LoadedModel, load_model
from llmo.inference.settings import InferenceSettings
from llmo.protos.inference.v1 import inference_service_pb2 as pb
from llmo.protos.inference.v1 import inference_service_pb2_grpc as pb_grpc

DEMO = "llmo-demo"
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"
# fp32 paged attention against the dense reference, as in the model parity tests.
ATOL = 1e-4


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_model(name=DEMO)


@pytest.fixture(scope="module")
def reference(demo: LoadedModel) -> tuple[list[int], torch.Tensor]:
    """The prompt's ids and, per position, the logprobs of the next token from a dense forward pass."""
    ids = demo.tokenizer.encode(PROMPT)
    with torch.inference_mode():
        logits = demo.model.forward_dense(torch.tensor([ids]))[0].float()
    return ids, torch.log_softmax(logits, -1)[:-1]


def _settings() -> InferenceSettings:
    return InferenceSettings(publish_events=False, metrics_port=-1, platform=PlatformSettings())


@pytest_asyncio.fixture
async def server(demo: LoadedModel) -> AsyncIterator[RunningInference]:
    # A small token budget so the prompt's prefill runs in several chunks.
    engine = LLMEngine(demo, EngineConfig(num_blocks=64, max_num_batched_tokens=8))
    backends: list[Backend] = [NativeBackend(demo, engine, DEMO)]
    running = await start(_settings(), port=0, http_port=0, metrics=False, backends=backends)
    yield running
    await running.stop()


def _expected(reference: tuple[list[int], torch.Tensor]) -> torch.Tensor:
    ids, logp = reference
    return logp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


async def test_grpc_returns_prompt_logprobs_once_on_the_first_message(
        server: RunningInference, reference: tuple[list[int], torch.Tensor]) -> None:
    ids, logp = reference
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        request = pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(
            max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=3))
        chunks = [c async for c in stub.Generate(request, timeout=60)]
    first = chunks[0].prompt_logprobs
    assert [p.token_id for p in first] == ids[1:]
    torch.testing.assert_close(torch.tensor([p.logprob for p in first]), _expected(reference), atol=ATOL, rtol=0)
    top_values = torch.topk(logp, 3, dim=-1).values
    for row, p in enumerate(first):
        assert len(p.top_logprobs) == 3
        torch.testing.assert_close(torch.tensor([t.logprob for t in p.top_logprobs]), top_values[row],
                                   atol=ATOL, rtol=0)
    assert all(not c.prompt_logprobs for c in chunks[1:])
    assert chunks[-1].usage.output_tokens == 4


async def _post(server: RunningInference, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as http:
        return await http.post(f"http://127.0.0.1:{server.http_port}/v1/completions", json={"model": DEMO, **body})


async def test_http_echo_returns_prompt_logprobs_first(server: RunningInference, demo: LoadedModel,
                                                       reference: tuple[list[int], torch.Tensor]) -> None:
    ids, _ = reference
    response = await _post(server, {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 3,
                                    "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    plain = (await _post(server, {"prompt": PROMPT, "max_tokens": 3, "temperature": 0,
                                  "ignore_eos": True})).json()["choices"][0]
    assert choice["text"] == PROMPT + plain["text"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 3
    assert lp["tokens"][0] == demo.tokenizer.decode([ids[0]], False)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # as OpenAI: nothing before it
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:len(ids)]), _expected(reference),
                               atol=ATOL, rtol=0)
    assert all(len(top) == 2 for top in lp["top_logprobs"][1:])
    assert lp["text_offset"][len(ids)] == len(PROMPT)  # the completion's tokens start after the prompt
    assert response.json()["usage"]["completion_tokens"] == 3


async def test_http_echo_with_max_tokens_zero_returns_only_the_prompt(
        server: RunningInference, reference: tuple[list[int], torch.Tensor]) -> None:
    ids, _ = reference
    response = await _post(server, {"prompt": PROMPT, "echo": True, "logprobs": 0, "max_tokens": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    (choice,) = body["choices"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == len(ids)
    assert len(choice["logprobs"]["tokens"]) == len(ids)
    torch.testing.assert_close(torch.tensor(choice["logprobs"]["token_logprobs"][1:]), _expected(reference),
                               atol=ATOL, rtol=0)
    # Without logprobs the prompt is echoed alone; without echo max_tokens must be positive.
    plain = (await _post(server, {"prompt": PROMPT, "echo": True, "max_tokens": 0})).json()["choices"][0]
    assert plain["text"] == PROMPT and plain["logprobs"] is None
    bad = await _post(server, {"prompt": PROMPT, "max_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    bad = await _post(server, {"prompt": ids, "echo": True, "max_tokens": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "echo"


async def test_http_echo_streams_the_prompt_first(server: RunningInference,
                                                  reference: tuple[list[int], torch.Tensor]) -> None:
    ids, _ = reference
    body = {"model": DEMO, "prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0,
            "ignore_eos": True, "stream": True}
    events = []
    async with httpx.AsyncClient(timeout=60) as http, http.stream(
            "POST", f"http://127.0.0.1:{server.http_port}/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    first = events[0]["choices"][0]
    assert first["text"] == PROMPT
    assert first["logprobs"]["token_logprobs"][0] is None
    torch.testing.assert_close(torch.tensor(first["logprobs"]["token_logprobs"][1:]), _expected(reference),
                               atol=ATOL, rtol=0)
    assert sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events[1:]) == 3
    assert events[1]["choices"][0]["logprobs"]["text_offset"][0] == len(PROMPT)
    assert len(first["logprobs"]["tokens"]) == len(ids)


async def test_external_backends_reject_prompt_logprobs(server: RunningInference) -> None:
    upstream = OpenAIBackend("proxied", f"http://127.0.0.1:{server.http_port}/v1", upstream_model=DEMO)
    proxy = await start(_settings(), port=0, http_port=-1, metrics=False, backends=[upstream])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            request = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=2, prompt_logprobs=1))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.Generate(request, timeout=30):
                    pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        detail = error_info(info.value)
        assert detail is not None and detail.reason == "INVALID_SAMPLING_PARAMS"
        assert detail.metadata["field"] == "prompt_logprobs"
    finally:
        await proxy.stop()
