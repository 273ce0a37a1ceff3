"""vLLM in process (AsyncLLMEngine), when the `vllm` package is importable."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from typing import Any

from llmo.core.errors import unavailable
from llmo.inference.backends.base import GenerationChunk, GenerationRequest, ModelInfo, TokenInfo
from llmo.inference.backends.streaming import CumulativeTracker


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VllmBackend:
    engine_name = "vllm"
    vocab_size = 0

    def __init__(self, model_id: str, model_path: str, dtype: str = "auto", **engine_args: Any) -> None:
        if not vllm_available():
            raise RuntimeError("the vllm backend needs the `vllm` package (pip install vllm) and a GPU")
        import vllm

        self.model_id = model_id
        self.model_path = model_path
        self._vllm = vllm
        args = vllm.AsyncEngineArgs(model=model_path, dtype=dtype, served_model_name=model_id, **engine_args)
        self.engine = vllm.AsyncLLMEngine.from_engine_args(args)
        self._context = 0

    async def start(self) -> None:
        config = await self.engine.get_model_config()
        self._context = int(config.max_model_len)

    async def stop(self) -> None:
        self.engine.shutdown()

    def info(self) -> ModelInfo:
        return ModelInfo(model_id=self.model_id, engine=self.engine_name, context_length=self._context)

    async def _encode(self, text: str | None, messages: list[dict[str, Any]] | None) -> list[int]:
        tokenizer = await self.engine.get_tokenizer()
        if messages:
            return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
        return list(tokenizer.encode(text or ""))

    async def count_tokens(self, text: str | None, messages: list[dict[str, Any]] | None) -> list[int]:
        return await self._encode(text, messages)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        request.check_input()
        p = request.params
        ids = request.prompt_token_ids or await self._encode(request.prompt, request.messages)
        sampling = self._vllm.SamplingParams(
            n=p.n, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or -1, seed=p.seed,
            repetition_penalty=p.repetition_penalty, stop=p.stop or None, stop_token_ids=p.stop_token_ids or None,
            ignore_eos=p.ignore_eos, max_tokens=p.max_tokens, logprobs=p.logprobs,
        )
        tracker = CumulativeTracker(p.n)
        prompt_tokens, cached = len(ids), 0
        finished = False
        try:
            async for out in self.engine.generate({"prompt_token_ids": list(ids)}, sampling, request.engine_id,
                                                  priority=request.priority):
                cached = int(getattr(out, "num_cached_tokens", 0) or 0)
                choices = []
                for o in out.outputs:
                    seen = tracker.tokens[o.index]
                    infos = [
                        TokenInfo(tid, str(step[tid].decoded_token or ""), float(step[tid].logprob),
                                  sorted(((t, str(lp.decoded_token or ""), float(lp.logprob)) for t, lp in step.items()),
                                         key=lambda x: -x[2])[: p.logprobs or 0])
                        for tid, step in zip(o.token_ids[seen:], (o.logprobs or [])[seen:], strict=False)
                    ]
                    chunk = tracker.delta(o.index, o.text, list(o.token_ids), o.finish_reason, infos)
                    if chunk is not None:
                        choices.append(chunk)
                if choices:
                    yield GenerationChunk(choices)
                finished = bool(out.finished)
        finally:
            if not finished:
                await self.engine.abort(request.engine_id)
        if not finished:
            raise unavailable("BACKEND_UNAVAILABLE", "vLLM ended the stream before the request finished")
        yield tracker.final(prompt_tokens, cached)
