"""gRPC InferenceService over the shared InferenceService core."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from llmo.core import context as ctx
from llmo.core.errors import invalid_argument
from llmo.core.limits import MAX_ID_LEN, check_identifier, preview
from llmo.core.logging import get_logger
from llmo.core.pagination import decode_page_token, encode_page_token, page_size
from llmo.inference.backends.base import GenerationRequest, ModelInfo
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
        model_id = self.registry.get(request.model).model_id
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

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        size = page_size(request.page_size)
        position = decode_page_token(request.page_token, query="models")
        ids = self.registry.ids()
        start = 0
        if position is not None:
            start = next((i for i, m in enumerate(ids) if m > str(position.get("after", ""))), len(ids))
        page = ids[start:start + size]
        response = pb.ListModelsResponse(models=[model_to_proto(self.registry.get(m).info()) for m in page])
        if start + size < len(ids):
            response.next_page_token = encode_page_token({"after": page[-1]}, query="models")
        return response

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=model_to_proto(self.registry.by_name(request.name).info()))
