"""vLLM and TensorRT-LLM adapters: run where the packages (and a GPU) are present, skip with the reason."""

from __future__ import annotations

import pytest
import torch

from llmo.inference.backends.base import GenerationRequest
from llmo.inference.backends.streaming import CumulativeTracker
from llmo.inference.backends.trtllm_backend import TensorRTLLMBackend, tensorrt_llm_available
from llmo.inference.backends.vllm_backend import VllmBackend, vllm_available
from llmo.inference.engine.engine import EngineConfig, LLMEngine
from llmo.inference.engine.params import SamplingParams
from llmo.inference.models.loader import load_model
from tests.unit.inference.conftest import CheckpointFactory

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM and TensorRT-LLM need an NVIDIA GPU")


def test_cumulative_outputs_become_deltas() -> None:
    tracker = CumulativeTracker(2)
    assert tracker.delta(0, "Hel", [1, 2], None) is not None
    chunk = tracker.delta(0, "Hello", [1, 2, 3], "stop")
    assert chunk is not None and (chunk.text, chunk.token_ids, chunk.finish_reason) == ("lo", [3], "stop")
    assert tracker.delta(1, "", [], None) is None
    final = tracker.final(prompt_tokens=4)
    assert final.usage is not None and final.usage.completion_tokens == 3


def test_adapters_refuse_clearly_without_their_package() -> None:
    if not vllm_available():
        with pytest.raises(RuntimeError, match="needs the `vllm` package"):
            VllmBackend("m", "/nowhere")
    if not tensorrt_llm_available():
        with pytest.raises(RuntimeError, match="needs the `tensorrt_llm` package"):
            TensorRTLLMBackend("m", "/nowhere")


async def _greedy(backend: VllmBackend | TensorRTLLMBackend, prompt: list[int]) -> list[int]:
    await backend.start()
    try:
        request = GenerationRequest("r1", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                                    prompt_token_ids=prompt)
        return [t async for chunk in backend.generate(request) for c in chunk.choices for t in c.token_ids]
    finally:
        await backend.stop()


@needs_gpu
@pytest.mark.gpu
@pytest.mark.skipif(not vllm_available(), reason="the vllm package is not installed")
async def test_vllm_matches_native_greedy(make_checkpoint: CheckpointFactory) -> None:
    path = make_checkpoint("llama")
    ours = load_model(path)
    prompt = ours.tokenizer.encode("To be, or not to be")
    (expected,) = LLMEngine(ours, EngineConfig()).generate([prompt], SamplingParams(max_tokens=8, temperature=0,
                                                                                   ignore_eos=True))
    got = await _greedy(VllmBackend("m", str(path), dtype="float32", enforce_eager=True), prompt)
    assert got == expected


@needs_gpu
@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_llm_available(), reason="the tensorrt_llm package is not installed")
async def test_tensorrt_llm_matches_native_greedy(make_checkpoint: CheckpointFactory) -> None:
    path = make_checkpoint("llama")
    ours = load_model(path)
    prompt = ours.tokenizer.encode("To be, or not to be")
    (expected,) = LLMEngine(ours, EngineConfig()).generate([prompt], SamplingParams(max_tokens=8, temperature=0,
                                                                                   ignore_eos=True))
    got = await _greedy(TensorRTLLMBackend("m", str(path)), prompt)
    assert got == expected
