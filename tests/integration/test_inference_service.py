"""The inference service over real sockets: gRPC, OpenAI-compatible HTTP (official client), NATS events,
and the openai backend serving through our own HTTP endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio

from llmo.core.errors import error_info
from llmo.core.settings import PlatformSettings
from llmo.inference.backends.base import Backend
from llmo.inference.backends.native import NativeBackend
from llmo.inference.backends.openai_backend import OpenAIBackend
from llmo.inference.engine.engine import EngineConfig, LLMEngine
from llmo.inference.main import RunningInference, start
from llmo.inference.models.loader import LoadedModel, load_model
from llmo.inference.settings import InferenceSettings
from llmo.protos.events.v1 import events_pb2
from llmo.protos.inference.v1 import inference_service_pb2 as pb
from llmo.protos.inference.v1 import inference_service_pb2_grpc as pb_grpc

DEMO = "llmo-demo"


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_model(name=DEMO)


def _settings(**kw: Any) -> InferenceSettings:
    return InferenceSettings(publish_events=False, metrics_port=-1, platform=PlatformSettings(), **kw)


def _native(loaded: LoadedModel, model_id: str, **config: Any) -> NativeBackend:
    engine = LLMEngine(loaded, EngineConfig(num_blocks=config.pop("num_blocks", 128), **config))
    return NativeBackend(loaded, engine, model_id)


@pytest_asyncio.fixture
async def server(demo: LoadedModel) -> AsyncIterator[RunningInference]:
    backends: list[Backend] = [_native(demo, DEMO), _native(demo, "demo-full", max_queue=0),
                               _native(demo, "demo-small", num_blocks=16)]
    running = await start(_settings(), port=0, http_port=0, metrics=False, backends=backends)
    yield running
    await running.stop()


@pytest_asyncio.fixture
async def stub(server: RunningInference) -> AsyncIterator[pb_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.InferenceServiceStub(channel)


async def _generate(stub: pb_grpc.InferenceServiceStub, **kw: Any) -> list[pb.GenerateResponse]:
    return [chunk async for chunk in stub.Generate(pb.GenerateRequest(**kw), timeout=60)]


async def test_generate_streams_text_usage_latency_and_logprobs(stub: pb_grpc.InferenceServiceStub,
                                                                demo: LoadedModel) -> None:
    chunks = await _generate(stub, prompt="ROMEO:\n", sampling=pb.SamplingParams(
        max_tokens=12, temperature=0, logprobs=2, ignore_eos=True))
    assert len(chunks) == 12
    text = "".join(c.text for ch in chunks for c in ch.choices)
    ids = [t for ch in chunks for c in ch.choices for t in c.token_ids]
    assert text == demo.tokenizer.decode(ids)
    last = chunks[-1]
    assert last.choices[0].finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.output_tokens == 12
    assert last.usage.input_tokens == len(demo.tokenizer.encode("ROMEO:\n"))
    assert last.latency.e2e_ms >= last.latency.ttft_ms > 0
    for ch in chunks:
        (lp,) = ch.choices[0].logprobs
        assert lp.token_id == ch.choices[0].token_ids[0] == lp.top_logprobs[0].token_id
        assert len(lp.top_logprobs) == 2
    # n > 1 with a seed: every choice finishes, the same request again gives the same samples.
    params = pb.SamplingParams(max_tokens=6, temperature=1.0, seed=5, n=3, ignore_eos=True)
    runs = []
    for _ in range(2):
        out = await _generate(stub, messages=[pb.ChatMessage(role="user", content="Speak.")], sampling=params)
        texts = ["", "", ""]
        for ch in out:
            for c in ch.choices:
                texts[c.index] += c.text
        runs.append(texts)
        assert out[-1].usage.output_tokens == 18
    assert runs[0] == runs[1]


async def test_count_tokens_list_and_get_models(stub: pb_grpc.InferenceServiceStub, demo: LoadedModel) -> None:
    counted = await stub.CountTokens(pb.CountTokensRequest(text="To be or not to be"))
    assert list(counted.token_ids) == demo.tokenizer.encode("To be or not to be")
    assert counted.context_length == 512
    chat = await stub.CountTokens(pb.CountTokensRequest(messages=[pb.ChatMessage(role="user", content="hi")]))
    assert list(chat.token_ids) == demo.tokenizer.encode("USER:\nhi\n\nASSISTANT:\n", add_special_tokens=False)
    first = await stub.ListModels(pb.ListModelsRequest(page_size=2))
    assert [m.model_id for m in first.models] == ["demo-full", "demo-small"]
    second = await stub.ListModels(pb.ListModelsRequest(page_size=2, page_token=first.next_page_token))
    assert [m.model_id for m in second.models] == [DEMO] and not second.next_page_token
    got = (await stub.GetModel(pb.GetModelRequest(name=f"models/{DEMO}"))).model
    assert got.architecture == "LlamaForCausalLM" and got.engine == "native"
    assert got.quantization == pb.QUANTIZATION_NONE and got.dtype == "float32"
    assert got.kv_blocks_free == got.kv_blocks_total == 128 and got.kv_block_size == 16
    from prometheus_client import REGISTRY

    # The gauges are kept current for the core /metrics port too, not only on an HTTP scrape.
    assert REGISTRY.get_sample_value("llmo_inference_kv_cache_usage_ratio", {"model": "demo-small"}) == 0.0
    assert REGISTRY.get_sample_value("llmo_inference_requests_waiting", {"model": "demo-full"}) == 0.0


async def _error(call: Any) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    detail = error_info(info.value)
    assert detail is not None and detail.domain == "llmo.inference"
    return info.value.code(), detail.reason, dict(detail.metadata)


async def test_errors_carry_codes_and_reasons(stub: pb_grpc.InferenceServiceStub) -> None:
    code, reason, meta = await _error(_generate(stub, prompt="hi", sampling=pb.SamplingParams(max_tokens=600)))
    assert (code, reason, meta["limit"]) == (grpc.StatusCode.INVALID_ARGUMENT, "CONTEXT_LENGTH_EXCEEDED", "512")
    code, reason, _ = await _error(_generate(stub, model="demo-full", prompt="hi"))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")
    code, reason, _ = await _error(_generate(stub, model="nope", prompt="hi"))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    code, reason, _ = await _error(_generate(stub, sampling=pb.SamplingParams(max_tokens=4)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "PROMPT_MISSING")
    code, reason, meta = await _error(_generate(stub, prompt="hi", sampling=pb.SamplingParams(top_p=1.5)))
    assert (code, reason, meta["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SAMPLING_PARAMS", "top_p")
    code, reason, _ = await _error(_generate(stub, prompt_token_ids=[99999]))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TOKEN_ID")
    code, reason, _ = await _error(stub.GetModel(pb.GetModelRequest(name="llmo-demo")))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MODEL_NAME")


async def _wait_all_blocks_free(stub: pb_grpc.InferenceServiceStub, model: str) -> pb.Model:
    for _ in range(200):
        got = (await stub.GetModel(pb.GetModelRequest(name=f"models/{model}"))).model
        if got.kv_blocks_free == got.kv_blocks_total and got.num_running == 0:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"KV blocks of {model} were not freed: {got}")


async def test_cancel_and_deadline_free_kv_blocks(stub: pb_grpc.InferenceServiceStub) -> None:
    request = pb.GenerateRequest(model="demo-small", prompt="KING:\n",
                                 sampling=pb.SamplingParams(max_tokens=250, ignore_eos=True))
    call = stub.Generate(request, timeout=60)
    async for _ in call:
        break
    busy = (await stub.GetModel(pb.GetModelRequest(name="models/demo-small"))).model
    assert busy.kv_blocks_free < busy.kv_blocks_total
    call.cancel()
    await _wait_all_blocks_free(stub, "demo-small")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Generate(request, timeout=0.2):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _wait_all_blocks_free(stub, "demo-small")


async def test_http_client_disconnect_frees_kv_blocks(server: RunningInference,
                                                      stub: pb_grpc.InferenceServiceStub) -> None:
    url = f"http://127.0.0.1:{server.http_port}/v1/completions"
    body = {"model": "demo-small", "prompt": "KING:\n", "max_tokens": 200, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient() as http, http.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                break
    await _wait_all_blocks_free(stub, "demo-small")


async def test_openai_client_streams_a_chat_completion(server: RunningInference) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused")
    stream = await client.chat.completions.create(
        model=DEMO, messages=[{"role": "user", "content": "Good morrow"}], max_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=2,
    )
    pieces, usage, finish = [], None, None
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
            if choice.logprobs and choice.logprobs.content:
                assert len(choice.logprobs.content[0].top_logprobs) == 2
    assert usage is not None and usage.completion_tokens == 10 and finish == "length"
    full = await client.chat.completions.create(
        model=DEMO, messages=[{"role": "user", "content": "Good morrow"}], max_tokens=10, temperature=0)
    assert full.choices[0].message.content == "".join(pieces)
    completion = await client.completions.create(model=DEMO, prompt="ROMEO:\n", max_tokens=5, temperature=0,
                                                 logprobs=1)
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert completion.choices[0].logprobs is not None and len(completion.choices[0].logprobs.tokens or []) == 5
    models = await client.models.list()
    assert DEMO in [m.id for m in models.data]
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model=DEMO, prompt="hi", max_tokens=1000)
    assert "context length of 512" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.RateLimitError):
        await client.completions.create(model="demo-full", prompt="hi", stream=True)
    await client.close()
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{server.http_port}/metrics")).text
    assert 'llmo_inference_time_to_first_token_seconds_count{model="llmo-demo"}' in text
    assert "llmo_inference_kv_cache_usage_ratio" in text


async def test_openai_backend_serves_through_our_http_endpoint(server: RunningInference) -> None:
    upstream = OpenAIBackend("proxied", f"http://127.0.0.1:{server.http_port}/v1", upstream_model=DEMO)
    proxy = await start(_settings(), port=0, http_port=-1, metrics=False, backends=[upstream])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
            proxied = pb_grpc.InferenceServiceStub(channel)
            params = pb.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
            via_proxy = await _generate(proxied, prompt="ROMEO:\n", sampling=params)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as direct_channel:
                direct = await _generate(pb_grpc.InferenceServiceStub(direct_channel), prompt="ROMEO:\n",
                                         sampling=params)
            text = "".join(c.text for ch in via_proxy for c in ch.choices)
            assert text == "".join(c.text for ch in direct for c in ch.choices)
            assert via_proxy[-1].usage.output_tokens == 8
            chat = await _generate(proxied, messages=[pb.ChatMessage(role="user", content="Speak")],
                                   sampling=params)
            assert chat[-1].usage.output_tokens == 8
            model = (await proxied.GetModel(pb.GetModelRequest(name="models/proxied"))).model
            assert model.engine == "openai"
            code, reason, _ = await _error(proxied.CountTokens(pb.CountTokensRequest(text="hi")))
            assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TOKENIZER_UNAVAILABLE")
            code, reason, _ = await _error(_generate(proxied, prompt="hi",
                                                     sampling=pb.SamplingParams(max_tokens=900)))
            assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SAMPLING_PARAMS")
    finally:
        await proxy.stop()


async def test_completed_event_is_published(nats_server: Any, demo: LoadedModel, tmp_path: Path) -> None:
    import nats

    # The outbox under tmp_path: nothing left over from another run is sent before this test's event.
    settings = InferenceSettings(publish_events=True, metrics_port=-1,
                                 platform=PlatformSettings(nats_url=nats_server.url, data_dir=tmp_path))
    running = await start(settings, port=0, http_port=-1, metrics=False, backends=[_native(demo, DEMO)])
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            await _generate(stub, prompt="ROMEO:\n", request_id="req-42",
                            sampling=pb.SamplingParams(max_tokens=5, ignore_eos=True))
        await running.service.drain()
        assert running.publisher is not None and await running.publisher.flush(10)  # out of the outbox
        sub = await js.pull_subscribe("llmo.inference.v1.completed", durable="test")
        (msg,) = await sub.fetch(1, timeout=10)
        event = events_pb2.InferenceCompleted.FromString(msg.data)
        assert event.request_id == "req-42" and event.model == DEMO and event.engine == "native"
        assert event.usage.output_tokens == 5 and event.finish_reason == "length"
        assert event.attribution.tenant == "default" and event.latency.ttft_ms > 0
        assert msg.headers and msg.headers["Nats-Msg-Id"] == event.event_id
        assert not event.HasField("content")  # user text stays off the bus unless event_content_sample asks
    finally:
        await nc.close()
        await running.stop()


async def test_sampled_completed_events_carry_their_content(nats_server: Any, demo: LoadedModel,
                                                            tmp_path: Path) -> None:
    import nats

    settings = InferenceSettings(publish_events=True, metrics_port=-1, event_content_sample=1.0,
                                 platform=PlatformSettings(nats_url=nats_server.url, data_dir=tmp_path))
    running = await start(settings, port=0, http_port=-1, metrics=False, backends=[_native(demo, DEMO)])
    nc = await nats.connect(nats_server.url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            chunks = await _generate(stub, prompt="ROMEO:\n", request_id="req-content",
                                     sampling=pb.SamplingParams(max_tokens=5, ignore_eos=True))
        await running.service.drain()
        assert running.publisher is not None and await running.publisher.flush(10)
        sub = await nc.jetstream().pull_subscribe("llmo.inference.v1.completed", durable="content")
        (msg,) = await sub.fetch(1, timeout=10)
        event = events_pb2.InferenceCompleted.FromString(msg.data)
        assert event.content.input == "ROMEO:\n" and not event.content.truncated
        assert event.content.output == "".join(c.text for r in chunks for c in r.choices) != ""
    finally:
        await nc.close()
        await running.stop()


async def test_cached_prompt_tokens_are_counted_apart_from_input_tokens(nats_server: Any, demo: LoadedModel,
                                                                        tmp_path: Path) -> None:
    """Regression: the event put the prefix-cache hits in `input_tokens` and again in
    `cached_input_tokens`, so a call whose inference event reached the ledger first was billed
    its cached tokens twice (llmo.common.v1.Usage: cached tokens are not part of input_tokens)."""
    import nats

    settings = InferenceSettings(publish_events=True, metrics_port=-1,
                                 platform=PlatformSettings(nats_url=nats_server.url, data_dir=tmp_path))
    running = await start(settings, port=0, http_port=-1, metrics=False, backends=[_native(demo, DEMO)])
    prompt = "ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n" * 3
    prompt_tokens = len(demo.tokenizer.encode(prompt))
    nc = await nats.connect(nats_server.url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            answers = [await _generate(stub, prompt=prompt, sampling=pb.SamplingParams(max_tokens=2, ignore_eos=True))
                       for _ in range(2)]
        await running.service.drain()
        assert running.publisher is not None and await running.publisher.flush(10)
        sub = await nc.jetstream().pull_subscribe("llmo.inference.v1.completed", durable="cached")
        events = [events_pb2.InferenceCompleted.FromString(m.data) for m in await sub.fetch(2, timeout=10)]
        assert len(events) == 2
        for usage in [a[-1].usage for a in answers] + [e.usage for e in events]:
            assert usage.input_tokens + usage.cached_input_tokens == prompt_tokens
        assert events[1].usage.cached_input_tokens > 0  # the second call hit the prefix cache
        assert answers[1][-1].usage.cached_input_tokens == events[1].usage.cached_input_tokens
    finally:
        await nc.close()
        await running.stop()


async def test_demo_step_runs_against_the_service(server: RunningInference) -> None:
    from llmo.inference.demo import run_demo

    lines = await run_demo({"inference": f"127.0.0.1:{server.port}",
                            "inference_http": f"http://127.0.0.1:{server.http_port}"})
    assert any("serving llmo-demo (LlamaForCausalLM, native" in line for line in lines)
    assert sum("gRPC Generate" in line for line in lines) == 2
    assert any("/v1/chat/completions" in line for line in lines)
