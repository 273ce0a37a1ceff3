"""gRPC InferenceService over the shared InferenceService core."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from llmo.core import context as ctx
from llmo.core.errors import (
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    permission_denied,
)
from llmo.core.limits import MAX_ID_LEN, check_identifier, preview
from llmo.core.logging import get_logger
from llmo.core.pagination import decode_page_token, encode_page_token, page_size
from llmo.inference.backends.base import Backend, GenerationRequest, ModelInfo
from llmo.inference.engine.adapters import AdapterHandle
from llmo.inference.engine.params import SamplingParams
from llmo.inference.service import Caller, InferenceService
from llmo.protos.inference.v1 import inference_service_pb2 as pb
from llmo.protos.inference.v1 import inference_service_pb2_grpc as pb_grpc

log = get_logger(__name__)

FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
QUANT = {"none": pb.QUANTIZATION_NONE, "int8": pb.QUANTIZATION_INT8, "int4": pb.QUANTIZATION_INT4}


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=msg.max_tokens or 16,
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        stop=list(msg.stop),
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        n=msg.n or 1,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
    )


def model_to_proto(info: ModelInfo) -> pb.Model:
    return pb.Model(
        name=f"models/{info.model_id}", model_id=info.model_id, engine=info.engine, architecture=info.architecture,
        quantization=QUANT.get(info.quantization, pb.QUANTIZATION_UNSPECIFIED),
        context_length=info.context_length, dtype=info.dtype, parameter_count=info.parameter_count,
        kv_block_size=info.kv_block_size, kv_blocks_total=info.kv_blocks_total, kv_blocks_free=info.kv_blocks_free,
        num_running=info.num_running, num_waiting=info.num_waiting,
        prefix_cache_hit_rate=info.prefix_cache_hit_rate,
    )


def adapter_to_proto(handle: AdapterHandle, base_model: str) -> pb.Adapter:
    return pb.Adapter(
        name=handle.name, base_model=base_model, source=handle.source, rank=handle.rank, alpha=handle.alpha,
        target_modules=handle.target_modules, size_bytes=handle.nbytes, loaded_at_unix_ms=int(handle.loaded_at * 1000),
        active_requests=handle.users,
    )


def _page_by_name(names: list[str], size: int, token: str, query: str) -> tuple[list[str], str]:
    """One page of sorted `names` after the page token's name, and the next page's token ("" at the end)."""
    size = page_size(size)
    position = decode_page_token(token, query=query)
    start = 0
    if position is not None:
        after = str(position.get("after", ""))
        start = next((i for i, name in enumerate(names) if name > after), len(names))
    page = names[start:start + size]
    more = start + size < len(names)
    return page, encode_page_token({"after": page[-1]}, query=query) if more else ""


def _require_admin(action: str) -> None:
    if not ctx.is_admin():
        raise permission_denied("ADMIN_REQUIRED", f"{action} needs an admin key (a tenant in LLMO_ADMIN_TENANTS)")


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, service: InferenceService) -> None:
        self.service = service
        self.registry = service.registry

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        request_id = self._request_id(request.request_id)
        gen = GenerationRequest(
            request_id=request_id, params=sampling_from_proto(request.sampling), prompt=request.prompt or None,
            messages=[{"role": m.role, "content": m.content} for m in request.messages] or None,
            prompt_token_ids=list(request.prompt_token_ids) or None, priority=request.priority,
        )
        # The interceptor resolved the tenant (the end tenant when a service key acts for one); a tenant
        # the request body names is never trusted.
        caller = Caller(ctx.current_tenant() or "", request.attribution.application, request.attribution.user)
        backend, adapter = self.registry.resolve(request.model)
        model_id = adapter or backend.model_id
        async for chunk in self.service.generate(request.model, gen, caller):
            out = pb.GenerateResponse(request_id=request_id, model=model_id)
            # The first prompt token has no logprob; the proto lists the others.
            for p in (chunk.prompt_logprobs or [])[1:]:
                out.prompt_logprobs.append(pb.TokenLogprob(
                    token_id=p.token_id, token=p.token, logprob=p.logprob or 0.0,
                    top_logprobs=[pb.TopLogprob(token_id=i, token=s, logprob=v) for i, s, v in p.top],
                ))
            for choice in chunk.choices:
                out.choices.append(pb.ChoiceDelta(
                    index=choice.index, text=choice.text, token_ids=choice.token_ids,
                    finish_reason=FINISH.get(choice.finish_reason or "", pb.FINISH_REASON_UNSPECIFIED),
                    logprobs=[
                        pb.TokenLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob, top_logprobs=[
                            pb.TopLogprob(token_id=i, token=s, logprob=v) for i, s, v in t.top
                        ]) for t in choice.logprobs
                    ],
                ))
            if chunk.usage is not None:
                out.usage.input_tokens = max(0, chunk.usage.prompt_tokens - chunk.usage.cached_tokens)
                out.usage.output_tokens = chunk.usage.completion_tokens
                out.usage.cached_input_tokens = chunk.usage.cached_tokens
            if chunk.timings is not None:
                t = chunk.timings
                out.latency.queue_ms = t.queue_s * 1000
                out.latency.ttft_ms = t.ttft_s * 1000
                out.latency.tpot_ms = t.tpot_s * 1000
                out.latency.e2e_ms = t.e2e_s * 1000
            yield out

    @staticmethod
    def _request_id(requested: str) -> str:
        """The call's id: the interceptor's (minted, or a service key's trusted `x-request-id`). The body's
        `request_id` is honoured only from an admin key acting as itself, like `x-request-id`; anyone
        else's is kept for log correlation only, so no client picks the dedupe key of its usage event."""
        current = ctx.current_request_id() or ctx.new_request_id()
        if not requested or requested == current:
            return current
        if ctx.is_admin():
            return check_identifier(requested, "request_id")
        log.info("client request id not trusted", client_request_id=preview(requested, MAX_ID_LEN))
        return current

    async def CountTokens(self, request: pb.CountTokensRequest, context: Any) -> pb.CountTokensResponse:
        if bool(request.text) == bool(request.messages):
            raise invalid_argument("PROMPT_MISSING", "set exactly one of text and messages")
        backend = self.registry.get(request.model)
        messages = [{"role": m.role, "content": m.content} for m in request.messages] or None
        ids = await backend.count_tokens(request.text or None, messages)
        return pb.CountTokensResponse(token_count=len(ids), token_ids=ids,
                                      context_length=backend.info().context_length)

    def _model(self, model_id: str) -> pb.Model:
        backend, adapter = self.registry.resolve(model_id)
        model = model_to_proto(backend.info())
        if adapter:
            model.name, model.model_id, model.base_model = f"models/{adapter}", adapter, backend.model_id
        return model

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        ids = sorted(self.registry.ids() + [handle.name for _, handle in self.registry.adapters()])
        page, token = _page_by_name(ids, request.page_size, request.page_token, "models")
        return pb.ListModelsResponse(models=[self._model(m) for m in page], next_page_token=token)

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.GetModelResponse:
        self.registry.by_name(request.name)
        return pb.GetModelResponse(model=self._model(request.name))

    def _adapter_host(self, base_model: str) -> Backend:
        backend, adapter = self.registry.resolve(base_model)
        if adapter is not None or getattr(backend, "adapters", None) is None:
            raise failed_precondition("ADAPTERS_UNSUPPORTED",
                                      f"model {backend.model_id!r} serves no adapters (native backend with "
                                      "LLMO_INFERENCE_MAX_ADAPTERS > 0 only)")
        return backend

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: Any) -> pb.LoadAdapterResponse:
        _require_admin("LoadAdapter")
        if not request.name:
            raise invalid_argument("INVALID_ADAPTER_NAME", "name is required", field="name")
        if self.registry.is_model_id(request.name):
            raise invalid_argument("INVALID_ADAPTER_NAME", f"{preview(request.name)!r} is a served model's id",
                                   field="name")
        if self.registry.adapter_owner(request.name) is not None:
            raise already_exists("ADAPTER_EXISTS", f"an adapter named {preview(request.name)!r} is already loaded; "
                                 "unload it first")
        backend = self._adapter_host(request.base_model)
        path = backend.resolve_adapter_path(request.path)  # type: ignore[attr-defined]
        handle = await backend.load_adapter(request.name, path)  # type: ignore[attr-defined]
        log.info("adapter loaded", adapter=handle.name, base_model=backend.model_id, source=handle.source,
                 rank=handle.rank, slot=handle.slot)
        return pb.LoadAdapterResponse(adapter=adapter_to_proto(handle, backend.model_id))

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: Any) -> pb.UnloadAdapterResponse:
        _require_admin("UnloadAdapter")
        backend = self.registry.adapter_owner(request.name)
        if backend is None:
            raise not_found("ADAPTER_NOT_FOUND", f"no adapter named {preview(request.name)!r} is loaded")
        handle = backend.unload_adapter(request.name)  # type: ignore[attr-defined]
        log.info("adapter unloaded", adapter=handle.name, base_model=backend.model_id,
                 running_requests=handle.users)
        return pb.UnloadAdapterResponse(adapter=adapter_to_proto(handle, backend.model_id))

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context: Any) -> pb.ListAdaptersResponse:
        loaded = {handle.name: (backend, handle) for backend, handle in self.registry.adapters()}
        names, token = _page_by_name(sorted(loaded), request.page_size, request.page_token, "adapters")
        response = pb.ListAdaptersResponse(
            adapters=[adapter_to_proto(loaded[n][1], loaded[n][0].model_id) for n in names], next_page_token=token)
        for backend in self.registry.all():
            adapters = getattr(backend, "adapters", None)
            if adapters is not None:
                response.free_slots[backend.model_id] = adapters.capacity - len(adapters.names())
        return response
