"""`make demo` step: completions from the bundled demo model over gRPC and OpenAI-compatible HTTP,
called directly (as the first tenant when API keys are on)."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from llmo.core.client import create_channel, outgoing_metadata
from llmo.protos.inference.v1 import inference_service_pb2 as pb
from llmo.protos.inference.v1 import inference_service_pb2_grpc as pb_grpc


async def run_demo(endpoints: dict[str, str], *, tenants: Mapping[str, str] | None = None, admin_key: str = "") -> list[str]:
    """`tenants` maps end tenants to API keys (empty: API keys off); the first one calls."""
    lines: list[str] = []
    tenant, key = next(iter((tenants or {}).items()), ("", ""))
    metadata = outgoing_metadata(key or None)
    if tenant:
        lines.append(f"inference: called directly as {tenant}")
    async with create_channel(endpoints["inference"]) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        models = await stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
        for model in models.models:
            lines.append(f"inference: serving {model.model_id} ({model.architecture}, {model.engine}, "
                         f"context {model.context_length}, {model.kv_blocks_free}/{model.kv_blocks_total} "
                         "KV blocks free)")
        for prompt in ("ROMEO:\n", "First Citizen:\nBefore we proceed"):
            text = ""
            usage = None
            latency = None
            request = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(
                max_tokens=40, temperature=0.8, top_p=0.95, seed=7))
            async for chunk in stub.Generate(request, metadata=metadata, timeout=60):
                text += "".join(c.text for c in chunk.choices)
                if chunk.HasField("usage"):
                    usage, latency = chunk.usage, chunk.latency
            assert usage is not None and latency is not None
            lines.append(f"inference gRPC Generate {prompt!r} -> {text!r} ({usage.output_tokens} tokens, "
                         f"TTFT {latency.ttft_ms:.0f} ms)")
    base = endpoints.get("inference_http")
    if base:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(base_url=base, timeout=60, headers=headers) as client:
            response = await client.post("/v1/chat/completions", json={
                "model": "", "messages": [{"role": "user", "content": "What news from Verona?"}],
                "max_tokens": 40, "temperature": 0.8, "seed": 3,
            })
            response.raise_for_status()
            body = response.json()
            lines.append(f"inference HTTP /v1/chat/completions -> {body['choices'][0]['message']['content']!r} "
                         f"(usage {body['usage']['completion_tokens']} tokens)")
    return lines
