"""TensorRT-LLM through its LLM API, when the `tensorrt_llm` package is importable."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator
from typing import Any

from llmo.inference.backends.base import GenerationChunk, GenerationRequest, ModelInfo
from llmo.inference.backends.streaming import CumulativeTracker


def tensorrt_llm_available() -> bool:
    return importlib.util.find_spec("tensorrt_llm") is not None


class TensorRTLLMBackend:
    engine_name = "tensorrt_llm"
    vocab_size = 0

    def __init__(self, model_id: str, model_path: str, **llm_args: Any) -> None:
        if not tensorrt_llm_available():
            raise RuntimeError("the tensorrt_llm backend needs the `tensorrt_llm` package and an NVIDIA GPU")
        import tensorrt_llm

        self.model_id = model_id
        self._trt = tensorrt_llm
        self.llm = tensorrt_llm.LLM(model=model_path, **llm_args)
        self.tokenizer = self.llm.tokenizer

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await asyncio.to_thread(self.llm.shutdown)

    def info(self) -> ModelInfo:
        context = int(getattr(self.llm.args, "max_seq_len", 0) or 0)
        return ModelInfo(model_id=self.model_id, engine=self.engine_name, context_length=context)

    async def count_tokens(self, text: str | None, messages: list[dict[str, Any]] | None) -> list[int]:
        if messages:
            return list(self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
        return list(self.tokenizer.encode(text or ""))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        request.check_input()
        p = request.params
        ids = request.prompt_token_ids or await self.count_tokens(request.prompt, request.messages)
        sampling = self._trt.SamplingParams(
            n=p.n, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or None,
            seed=p.seed, repetition_penalty=p.repetition_penalty, stop=p.stop or None,
            stop_token_ids=p.stop_token_ids or None, ignore_eos=p.ignore_eos,
        )
        tracker = CumulativeTracker(p.n)
        result = self.llm.generate_async(list(ids), sampling_params=sampling, streaming=True)
        finished = False
        try:
            async for out in result:
                choices = [c for o in out.outputs
                           if (c := tracker.delta(o.index, o.text, list(o.token_ids), o.finish_reason))]
                if choices:
                    yield GenerationChunk(choices)
                finished = bool(out.finished)
        finally:
            if not finished:
                result.abort()
        yield tracker.final(len(ids))
