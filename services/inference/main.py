"""The inference service, declared on the service kit: gRPC InferenceService, OpenAI-compatible
HTTP, engine gauges and usage events through the outbox."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmo.core import kit as service_kit
from llmo.core.kit import Kit, ServiceSpec
from llmo.core.logging import get_logger
from llmo.inference import metrics
from llmo.inference.backends.base import Backend
from llmo.inference.http_api import PUBLIC, OpenAIApp
from llmo.inference.registry import ModelRegistry
from llmo.inference.service import InferenceService
from llmo.inference.servicer import InferenceServicer
from llmo.inference.settings import InferenceSettings
from llmo.protos.inference.v1 import inference_service_pb2_grpc

if TYPE_CHECKING:
    from llmo.inference.engine.adapters import AdapterRegistry
    from llmo.inference.models.loader import LoadedModel

log = get_logger(__name__)

SERVICE_NAME = "llmo.inference.v1.InferenceService"


def build_backend(settings: InferenceSettings) -> Backend:
    """The configured backend (loading a native model takes seconds; call it off the event loop)."""
    if settings.backend == "openai":
        from llmo.inference.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(settings.model_name, settings.openai_base_url, settings.openai_api_key,
                             settings.openai_model or settings.model_name, settings.openai_timeout_s)
    if settings.backend == "vllm":
        from llmo.inference.backends.vllm_backend import VllmBackend

        return VllmBackend(settings.model_name, settings.model_path, settings.dtype or "auto")
    if settings.backend == "tensorrt_llm":
        from llmo.inference.backends.trtllm_backend import TensorRTLLMBackend

        return TensorRTLLMBackend(settings.model_name, settings.model_path)
    from llmo.inference.backends.native import NativeBackend
    from llmo.inference.engine.engine import EngineConfig, LLMEngine
    from llmo.inference.models.loader import load_model
    from llmo.inference.models.lora import read_adapter

    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(settings.model_path or None, dtype=settings.dtype or None, name=settings.model_name,
                        quantization=settings.quantization, device=device)
    engine = LLMEngine(loaded, EngineConfig(
        block_size=settings.block_size, num_blocks=settings.num_kv_blocks, max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens, enable_prefix_caching=settings.enable_prefix_caching,
        max_queue=settings.max_queue,
    ), adapters=_adapter_registry(settings, loaded))
    adapter_dir = Path(settings.adapter_dir) if settings.adapter_dir else settings.platform.data_dir / "adapters"
    backend = NativeBackend(loaded, engine, settings.model_name, adapter_dir=adapter_dir)
    if settings.adapters and engine.adapters is None:
        raise ValueError("LLMO_INFERENCE_ADAPTERS names adapters but LLMO_INFERENCE_MAX_ADAPTERS is 0")
    for name, path in settings.adapters.items():
        assert engine.adapters is not None
        engine.adapters.load(name, read_adapter(path, loaded.config, max_rank=settings.max_adapter_rank), path)
        log.info("adapter loaded", adapter=name, source=path)
    return backend


def _adapter_registry(settings: InferenceSettings, loaded: LoadedModel) -> AdapterRegistry | None:
    """The adapter slots of the native model, sized by the settings (None when adapters are off)."""
    from llmo.inference.engine.adapters import AdapterRegistry
    from llmo.inference.models.lora import AdapterSlots

    if settings.max_adapters == 0:
        return None
    need = AdapterSlots.bytes_needed(loaded.config, settings.max_adapters, settings.max_adapter_rank, loaded.dtype)
    if need > settings.adapter_memory_mb * (1 << 20):
        raise ValueError(
            f"{settings.max_adapters} adapter slots of rank {settings.max_adapter_rank} need {need / (1 << 20):.0f} MiB "
            f"for this model, over LLMO_INFERENCE_ADAPTER_MEMORY_MB={settings.adapter_memory_mb}; lower "
            "LLMO_INFERENCE_MAX_ADAPTERS or LLMO_INFERENCE_MAX_ADAPTER_RANK, or raise the limit"
        )
    slots = AdapterSlots(loaded.model, loaded.config, settings.max_adapters, settings.max_adapter_rank, loaded.dtype)
    return AdapterRegistry(slots, settings.model_name)


async def build(kit: Kit[InferenceSettings], backends: list[Backend] | None = None) -> None:
    settings = kit.settings
    if backends is None:
        backends = [await asyncio.to_thread(build_backend, settings)]
    registry = ModelRegistry(backends)
    await registry.start()
    # usage events wait in the outbox while NATS is down or not yet connected
    publisher = kit.outbox_publisher() if settings.publish_events else None
    service = InferenceService(registry, publisher, content_sample=settings.event_content_sample)
    kit.on_stop(service.drain)
    kit.on_stop(registry.stop)  # closers run last-declared first: the models stop, then in-flight work drains
    kit.task("gauges", lambda: _refresh_gauges(registry, settings.gauge_interval_s))
    kit.grpc(inference_service_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(service),
             SERVICE_NAME)
    front = OpenAIApp(service, settings.platform, max_body_bytes=settings.http_max_body_bytes)
    kit.http(max_body_bytes=settings.http_max_body_bytes, public_paths=PUBLIC).add_routes(front.routes())
    kit.expose(registry=registry, service=service)
    log.info("inference models loaded", models=registry.ids(), backend=settings.backend)


SERVICE = ServiceSpec("inference", InferenceSettings, build)
RunningInference = Kit[InferenceSettings]


async def start(settings: InferenceSettings, *, port: int | None = None, http_port: int | None = None,
                metrics: bool = True, backends: list[Backend] | None = None) -> RunningInference:
    """Start the inference service and return its handle; port=0 / http_port=0 bind free ports.
    `backends` replaces the configured one (tests, embedding in another process)."""
    spec = SERVICE if backends is None else ServiceSpec(SERVICE.name, InferenceSettings,
                                                         functools.partial(build, backends=backends))
    return await service_kit.start_service(spec, settings, port=port, http_port=http_port, metrics=metrics)


async def _refresh_gauges(registry: ModelRegistry, interval_s: float) -> None:
    """Keep the engine gauges (running, waiting, KV usage, prefix hits) current for any /metrics scraper."""
    while True:
        metrics.refresh_gauges(registry)
        await asyncio.sleep(interval_s)


async def serve(settings: InferenceSettings | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    await service_kit.serve(SERVICE, settings)
