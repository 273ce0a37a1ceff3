"""Client for our inference service over gRPC (`llmo.inference.v1.InferenceService/Generate`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from llmo.core.auth import REQUEST_ID_HEADER
from llmo.core.client import create_channel, outgoing_metadata
from llmo.core.errors import error_info
from llmo.router.providers.base import ChatRequest, Chunk, ProviderError, Usage

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
# The request was refused as such (bad parameters, unknown model, prompt too long).
_CLIENT = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
           grpc.StatusCode.FAILED_PRECONDITION}
_FINISH = {1: "stop", 2: "length"}


class InferenceGrpcClient:
    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        *,
        first_token_timeout_s: float = 10.0,
        idle_timeout_s: float = 10.0,
        total_timeout_s: float = 120.0,
    ) -> None:
        self.target = target
        self.api_key = api_key
        self.first_token_timeout_s = first_token_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.total_timeout_s = total_timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    def _get_stub(self) -> Any:
        if self._stub is None:
            from llmo.protos.inference.v1 import inference_service_pb2_grpc

            self._channel = create_channel(self.target, max_attempts=1)
            self._stub = inference_service_pb2_grpc.InferenceServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    async def stream(self, request: ChatRequest) -> AsyncIterator[Chunk]:
        from llmo.protos.common.v1 import common_pb2
        from llmo.protos.inference.v1 import inference_service_pb2 as pb

        s = request.sampling
        if s.presence_penalty or s.frequency_penalty:
            raise ProviderError(
                "UPSTREAM_UNSUPPORTED", "the llmo inference service has no presence/frequency penalty",
                retryable=False, client_error=True,
                param="presence_penalty" if s.presence_penalty else "frequency_penalty",
            )
        sampling = pb.SamplingParams(max_tokens=request.max_tokens or 0, stop=list(s.stop), top_k=s.top_k or 0)
        if s.temperature is not None:
            sampling.temperature = s.temperature
        if s.top_p is not None:
            sampling.top_p = s.top_p
        if s.seed is not None:
            sampling.seed = s.seed
        msg = pb.GenerateRequest(
            model=request.model,
            messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in request.messages],
            sampling=sampling,
            attribution=common_pb2.Attribution(application=request.application, user=request.user),
        )
        metadata = [
            (k, v) for k, v in outgoing_metadata(self.api_key, on_behalf_of=request.tenant or None) if k != REQUEST_ID_HEADER
        ]
        if request.request_id:
            metadata.append((REQUEST_ID_HEADER, request.request_id))
        call = self._get_stub().Generate(msg, timeout=self.total_timeout_s, metadata=metadata)
        first = True
        finished = False
        try:
            while True:
                wait = self.first_token_timeout_s if first else self.idle_timeout_s
                try:
                    async with asyncio.timeout(wait):
                        resp = await call.read()
                except TimeoutError as exc:
                    call.cancel()
                    raise ProviderError("UPSTREAM_HUNG", f"no token within {wait:g}s", retryable=True) from exc
                if resp is grpc.aio.EOF:
                    break
                first = False
                usage = None
                if resp.HasField("usage"):
                    cached = int(resp.usage.cached_input_tokens)
                    usage = Usage(int(resp.usage.input_tokens) + cached, int(resp.usage.output_tokens), cached)
                text = "".join(c.text for c in resp.choices if c.index == 0)
                reason = next((_FINISH.get(int(c.finish_reason)) for c in resp.choices if c.finish_reason), None)
                finished = finished or reason is not None
                if text or reason or usage:
                    yield Chunk(text=text, finish_reason=reason, usage=usage)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            info = error_info(exc)
            raise ProviderError(
                f"UPSTREAM_{code.name}",
                f"inference service: {exc.details()}",
                retryable=code in _RETRYABLE,
                client_error=code in _CLIENT,
                param=(info.metadata.get("field") or None) if info is not None else None,
            ) from exc
        if not finished:
            raise ProviderError("UPSTREAM_TRUNCATED", "inference stream ended without a finish reason", retryable=True)
