"""What gRPC and HTTP share: run a generation on the right backend, record metrics, emit the event."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from llmo.core.content import completion_content, sampled
from llmo.core.errors import invalid_argument
from llmo.core.events import EventPublisher
from llmo.core.limits import MAX_ID_LEN, check_text
from llmo.core.logging import get_logger
from llmo.inference import metrics
from llmo.inference.backends.base import GenerationChunk, GenerationRequest, Timings, Usage
from llmo.inference.engine.params import SamplingError, SamplingParams
from llmo.inference.registry import ModelRegistry
from llmo.protos.common.v1 import common_pb2
from llmo.protos.events.v1 import events_pb2

log = get_logger(__name__)


@dataclass
class Caller:
    """Whom an inference is attributed to: the tenant comes from the edge (API key, or the end tenant a
    service key acts for), application and user from the request (bounded: they go into every event)."""

    tenant: str
    application: str = ""
    user: str = ""

    def __post_init__(self) -> None:
        check_text(self.application, "application", max_len=MAX_ID_LEN, reason="INVALID_ATTRIBUTION")
        check_text(self.user, "user", max_len=MAX_ID_LEN, reason="INVALID_ATTRIBUTION")


def check_sampling(params: SamplingParams, vocab_size: int = 0,
                   names: Mapping[str, str] | None = None) -> SamplingParams:
    """The one validation of sampling parameters for every edge: INVALID_ARGUMENT
    (`INVALID_SAMPLING_PARAMS`) with `field` the request's name for the bad parameter (`names` maps
    SamplingParams attributes to an edge's own names, e.g. HTTP chat's `top_logprobs`)."""
    try:
        params.validate(vocab_size)
    except SamplingError as exc:
        field = (names or {}).get(exc.field, exc.field)
        raise invalid_argument("INVALID_SAMPLING_PARAMS", str(exc), field=field) from exc
    return params


def _asked(request: GenerationRequest) -> str:
    """The last user message of a chat request, else the prompt (token-id prompts carry no text)."""
    if request.messages:
        return next((str(m.get("content", "")) for m in reversed(request.messages) if m.get("role") == "user"), "")
    return request.prompt or ""


class InferenceService:
    def __init__(self, registry: ModelRegistry, bus: EventPublisher | None = None, *,
                 content_sample: float = 0.0) -> None:
        self.registry = registry
        self.bus = bus
        # Share of completed events that carry their text (InferenceSettings.event_content_sample).
        self.content_sample = content_sample
        self._pending: set[asyncio.Task[None]] = set()

    async def generate(self, model: str, request: GenerationRequest, caller: Caller,
                       param_names: Mapping[str, str] | None = None) -> AsyncGenerator[GenerationChunk, None]:
        """`request.request_id` is the platform's id of the call (minted, or a trusted service's), used as
        the event's request id; `param_names` as in `check_sampling`."""
        backend, adapter = self.registry.resolve(model)
        request.adapter = adapter
        served = adapter or backend.model_id
        request.check_input()
        check_sampling(request.params, backend.vocab_size, param_names)
        if request.params.prompt_logprobs is not None and backend.engine_name != "native":
            raise invalid_argument("INVALID_SAMPLING_PARAMS",
                                   f"prompt_logprobs is not supported by the {backend.engine_name} backend",
                                   field="prompt_logprobs")
        started = time.monotonic()
        usage: Usage | None = None
        timings: Timings | None = None
        finish = "error"
        reasons: dict[int, str] = {}
        keep_text = self.bus is not None and sampled(request.request_id, self.content_sample)
        text: list[str] = []
        try:
            async for chunk in backend.generate(request):
                for choice in chunk.choices:
                    if keep_text and choice.index == 0:
                        text.append(choice.text)
                    if choice.finish_reason:
                        reasons[choice.index] = choice.finish_reason
                if chunk.usage is not None:
                    usage, timings = chunk.usage, chunk.timings
                    finish = reasons.get(0, "stop")
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            finish = "cancelled"
            raise
        finally:
            if usage is None:
                usage = Usage()
                timings = Timings(e2e_s=time.monotonic() - started)
            assert timings is not None
            if finish != "error" or usage.completion_tokens:
                metrics.record_request(served, usage, timings, finish)
            info = backend.info()
            content = None
            if keep_text and finish not in ("error", "cancelled"):
                content = completion_content(_asked(request), "".join(text))
            self._emit(request.request_id, served, backend.engine_name, info.quantization, caller,
                       usage, timings, finish, content, base_model=backend.model_id if adapter else "")

    def _emit(self, request_id: str, model: str, engine: str, quantization: str, caller: Caller, usage: Usage,
              timings: Timings, finish: str, content: events_pb2.CompletionContent | None = None,
              base_model: str = "") -> None:
        if self.bus is None:
            return
        occurred = timestamp_pb2.Timestamp()
        occurred.GetCurrentTime()
        event = events_pb2.InferenceCompleted(
            event_id=str(uuid.uuid4()), request_id=request_id, occurred_at=occurred,
            attribution=common_pb2.Attribution(tenant=caller.tenant, application=caller.application,
                                               user=caller.user),
            model=model, engine=engine, provider="self-hosted" if engine == "native" else engine,
            # cached tokens are counted apart from input_tokens (llmo.common.v1.Usage), as the router's
            # event of the same call counts them, so the ledger bills the call the same either way
            usage=common_pb2.Usage(input_tokens=max(0, usage.prompt_tokens - usage.cached_tokens),
                                   output_tokens=usage.completion_tokens, cached_input_tokens=usage.cached_tokens),
            latency=common_pb2.Latency(queue_ms=timings.queue_s * 1000, ttft_ms=timings.ttft_s * 1000,
                                       tpot_ms=timings.tpot_s * 1000, e2e_ms=timings.e2e_s * 1000),
            finish_reason=finish, quantization=quantization, base_model=base_model,
        )
        if content is not None:
            event.content.CopyFrom(content)
        task = asyncio.get_running_loop().create_task(self._publish(event))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish(self, event: events_pb2.InferenceCompleted) -> None:
        assert self.bus is not None
        try:
            await self.bus.publish(event)
        except Exception as exc:
            log.warning("publishing inference event failed", error=str(exc), request_id=event.request_id)

    async def drain(self) -> None:
        """Wait for events still being published (shutdown)."""
        if self._pending:
            with contextlib.suppress(Exception):
                await asyncio.wait(self._pending, timeout=5)
