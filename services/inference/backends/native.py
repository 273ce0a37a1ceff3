"""The native backend: our engine on a locally loaded checkpoint."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from llmo.core.errors import (
    ServiceError,
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    permission_denied,
    resource_exhausted,
)
from llmo.inference.backends.base import (
    ChoiceChunk,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    PromptTokenInfo,
    Timings,
    TokenInfo,
    Usage,
)
from llmo.inference.engine.adapters import AdapterHandle, AdapterRegistry
from llmo.inference.engine.async_engine import AsyncEngine
from llmo.inference.engine.engine import ContextLengthError, LLMEngine, QueueFullError
from llmo.inference.engine.params import SamplingError
from llmo.inference.engine.sequence import Request, SequenceDelta
from llmo.inference.models.loader import LoadedModel
from llmo.inference.models.lora import AdapterError, read_adapter
from llmo.inference.tokenizer import ChatTemplateError


def to_service_error(exc: Exception) -> ServiceError:
    """Engine exceptions as the API's errors (reasons documented in inference_service.proto)."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, AdapterError):
        return adapter_error(exc)
    if isinstance(exc, ContextLengthError):
        return invalid_argument("CONTEXT_LENGTH_EXCEEDED", str(exc), limit=exc.limit, requested=exc.requested)
    if isinstance(exc, QueueFullError):
        return resource_exhausted("QUEUE_FULL", str(exc), limit=exc.limit)
    if isinstance(exc, ChatTemplateError):
        return invalid_argument("CHAT_TEMPLATE_ERROR", str(exc))
    if isinstance(exc, SamplingError):
        return invalid_argument("INVALID_SAMPLING_PARAMS", str(exc), field=exc.field)
    if not isinstance(exc, ValueError):
        return ServiceError(grpc.StatusCode.INTERNAL, "ENGINE_ERROR", f"the engine failed: {exc}")
    message = str(exc)
    if "token ids" in message:
        return invalid_argument("INVALID_TOKEN_ID", message, field="prompt_token_ids")
    if "prompt is empty" in message:
        return invalid_argument("PROMPT_MISSING", message)
    return invalid_argument("INVALID_REQUEST", message)


def adapter_error(exc: AdapterError) -> ServiceError:
    """Adapter errors as the API's (reasons documented in inference_service.proto)."""
    if exc.reason == "ADAPTER_NOT_FOUND":
        return not_found(exc.reason, str(exc))
    if exc.reason == "ADAPTER_EXISTS":
        return already_exists(exc.reason, str(exc))
    if exc.reason == "ADAPTER_LIMIT":
        return resource_exhausted(exc.reason, str(exc))
    return invalid_argument(exc.reason, str(exc))


class NativeBackend:
    engine_name = "native"

    def __init__(self, loaded: LoadedModel, engine: LLMEngine, model_id: str | None = None,
                 adapter_dir: Path | None = None) -> None:
        self.loaded = loaded
        self.model_id = model_id or loaded.name
        self.engine = engine
        # LoadAdapter reads adapters from under this directory only (None: from anywhere, for embedding/tests).
        self.adapter_dir = adapter_dir.resolve() if adapter_dir is not None else None
        self.async_engine = AsyncEngine(engine)
        self.tokenizer = loaded.tokenizer
        self.vocab_size = loaded.config.vocab_size

    async def start(self) -> None:
        await self.async_engine.start()

    async def stop(self) -> None:
        await self.async_engine.stop()

    def info(self) -> ModelInfo:
        stats = self.engine.stats()
        return ModelInfo(
            model_id=self.model_id, engine=self.engine_name, architecture=self.loaded.config.architecture,
            quantization=self.loaded.quantization, context_length=self.loaded.context_length,
            dtype=str(self.loaded.dtype).removeprefix("torch."),
            parameter_count=sum(p.numel() for p in self.loaded.model.parameters()),
            kv_block_size=self.engine.config.block_size, kv_blocks_total=stats.kv_blocks_total,
            kv_blocks_free=stats.kv_blocks_free, num_running=stats.num_running,
            num_waiting=self.async_engine.num_waiting(), prefix_cache_hit_rate=stats.prefix_hit_rate,
        )

    @property
    def adapters(self) -> AdapterRegistry | None:
        return self.engine.adapters

    def _registry(self) -> AdapterRegistry:
        if self.engine.adapters is None:
            raise failed_precondition("ADAPTERS_UNSUPPORTED",
                                      f"model {self.model_id!r} serves no adapters (LLMO_INFERENCE_MAX_ADAPTERS=0)")
        return self.engine.adapters

    def resolve_adapter_path(self, path: str) -> Path:
        """An adapter directory named by a client: relative to the adapter directory, or absolute inside it."""
        if not path or "\x00" in path:
            raise invalid_argument("ADAPTER_INVALID", "path must name an adapter directory", field="path")
        if self.adapter_dir is None:
            return Path(path).resolve()
        resolved = (self.adapter_dir / path).resolve()
        if not resolved.is_relative_to(self.adapter_dir):
            raise permission_denied("ADAPTER_PATH_FORBIDDEN",
                                    f"adapters are loaded from under {self.adapter_dir} (LLMO_INFERENCE_ADAPTER_DIR) only")
        return resolved

    async def load_adapter(self, name: str, path: Path) -> AdapterHandle:
        """Read, check and serve an adapter under `name` (reading and writing its slot run off the event loop)."""
        registry = self._registry()
        try:
            registry.check_name(name)
            return await asyncio.to_thread(self._load_adapter_blocking, registry, name, path)
        except AdapterError as exc:
            raise adapter_error(exc) from exc

    def _load_adapter_blocking(self, registry: AdapterRegistry, name: str, path: Path) -> AdapterHandle:
        adapter = read_adapter(path, self.loaded.config, max_rank=registry.slots.rank)
        return registry.load(name, adapter, str(path))

    def unload_adapter(self, name: str) -> AdapterHandle:
        try:
            return self._registry().unload(name)
        except AdapterError as exc:
            raise adapter_error(exc) from exc

    def encode(self, text: str | None, messages: list[dict[str, Any]] | None) -> list[int]:
        try:
            if messages:
                return self.tokenizer.encode_chat(messages)
            return self.tokenizer.encode(text or "")
        except ChatTemplateError as exc:
            raise to_service_error(exc) from exc

    async def count_tokens(self, text: str | None, messages: list[dict[str, Any]] | None) -> list[int]:
        if not text and not messages:
            raise invalid_argument("PROMPT_MISSING", "set exactly one of text and messages")
        return await asyncio.to_thread(self.encode, text, messages)

    def _token_info(self, delta: SequenceDelta) -> list[TokenInfo]:
        decode = self.tokenizer.decode
        return [
            TokenInfo(lp.token_id, decode([lp.token_id], False), lp.logprob,
                      [(t, decode([t], False), v) for t, v in lp.top])
            for lp in delta.logprobs
        ]

    def _prompt_info(self, prompt_ids: list[int], delta: SequenceDelta) -> list[PromptTokenInfo]:
        decode = self.tokenizer.decode
        first = PromptTokenInfo(prompt_ids[0], decode([prompt_ids[0]], False), None)
        return [first] + [
            PromptTokenInfo(lp.token_id, decode([lp.token_id], False), lp.logprob,
                            [(t, decode([t], False), v) for t, v in lp.top])
            for lp in delta.prompt_logprobs or []
        ]

    def _check_text_length(self, request: GenerationRequest) -> None:
        """Refuse text that cannot fit the context before spending seconds of CPU tokenizing it."""
        chars = len(request.prompt or "") + sum(len(str(m.get("content", ""))) for m in request.messages or [])
        at_least = self.tokenizer.min_tokens(chars)
        total = at_least + request.params.max_tokens
        limit = self.loaded.context_length
        if total > limit:
            raise to_service_error(ContextLengthError(
                f"the prompt ({chars} characters, at least {at_least} tokens) + max_tokens "
                f"({request.params.max_tokens}) exceeds the model's context length of {limit} tokens", limit, total))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        request.check_input()
        if request.prompt_token_ids:
            prompt_ids = list(request.prompt_token_ids)
        else:
            self._check_text_length(request)
            prompt_ids = await asyncio.to_thread(self.encode, request.prompt, request.messages)
        try:
            stream = self.async_engine.generate(request.engine_id, prompt_ids, request.params, request.priority,
                                                request.adapter)
            start = time.monotonic()
            first_token: float | None = None
            completion = 0
            last_delta: SequenceDelta | None = None
            async for result in stream:
                now = time.monotonic()
                if first_token is None and result.deltas:
                    first_token = now
                choices = []
                prompt_info: list[PromptTokenInfo] | None = None
                for d in result.deltas:
                    completion += len(d.token_ids)
                    last_delta = d
                    choices.append(ChoiceChunk(d.index, d.text, list(d.token_ids), self._token_info(d),
                                               d.finish_reason))
                    if d.prompt_logprobs is not None:
                        prompt_info = self._prompt_info(prompt_ids, d)
                chunk = GenerationChunk(choices, prompt_logprobs=prompt_info)
                if result.done:
                    cached = last_delta.num_cached_tokens if last_delta else 0
                    chunk.usage = Usage(len(prompt_ids), completion, cached)
                    chunk.timings = _timings(result.request, start, first_token, now, completion, request.params.n)
                yield chunk
        except (ValueError, RuntimeError) as exc:
            if isinstance(exc, ServiceError):
                raise
            raise to_service_error(exc) from exc


def _timings(request: Request | None, start: float, first_token: float | None, end: float, completion: int,
             n: int) -> Timings:
    arrival = request.arrival_time if request else start
    scheduled = request.first_scheduled_time if request and request.first_scheduled_time else arrival
    first = first_token or end
    per_seq = max(completion // max(n, 1), 1)
    return Timings(
        queue_s=max(scheduled - arrival, 0.0), ttft_s=max(first - arrival, 0.0),
        tpot_s=(end - first) / (per_seq - 1) if per_seq > 1 else 0.0, e2e_s=max(end - arrival, 0.0),
    )
