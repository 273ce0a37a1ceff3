"""Run the inference service: gRPC InferenceService + OpenAI-compatible HTTP + /metrics + events."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import torch
from aiohttp import web

from llmo.core.events import EventBus
from llmo.core.logging import get_logger
from llmo.core.metrics import start_service_metrics
from llmo.core.outbox import Publisher
from llmo.core.server import GrpcServer, serve_until_signal
from llmo.inference import metrics
from llmo.inference.backends.base import Backend
from llmo.inference.http_api import OpenAIApp
from llmo.inference.registry import ModelRegistry
from llmo.inference.service import InferenceService
from llmo.inference.servicer import InferenceServicer
from llmo.inference.settings import InferenceSettings
from llmo.protos.inference.v1 import inference_service_pb2_grpc

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
    ))
    return NativeBackend(loaded, engine, settings.model_name)


@dataclass
class RunningInference:
    settings: InferenceSettings
    registry: ModelRegistry
    service: InferenceService
    server: GrpcServer
    port: int
    http_runner: web.AppRunner | None
    http_port: int | None
    bus: EventBus | None
    gauges: asyncio.Task[None] | None = None
    publisher: Publisher | None = None

    async def stop(self) -> None:
        if self.gauges is not None:
            self.gauges.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.gauges
        await self.server.stop()
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        await self.registry.stop()
        await self.service.drain()
        if self.publisher is not None:
            await self.publisher.stop()
        if self.bus is not None:
            await self.bus.close()


async def start(settings: InferenceSettings, *, port: int | None = None, http_port: int | None = None,
                metrics: bool = True, backends: list[Backend] | None = None) -> RunningInference:
    """Start everything and return a handle; port=0 / http_port=0 bind free ports."""
    if backends is None:
        backends = [await asyncio.to_thread(build_backend, settings)]
    registry = ModelRegistry(backends)
    await registry.start()
    bus: EventBus | None = None
    publisher: Publisher | None = None
    if settings.publish_events:
        # usage events wait in the outbox while NATS is down or not yet connected
        bus = EventBus(settings.platform.nats_url, name="llmo-inference")
        bus.connect_in_background()
        publisher = await Publisher.for_service(settings, bus).start()
    service = InferenceService(registry, publisher)
    server = GrpcServer("inference", settings, port=port)
    server.add_service(inference_service_pb2_grpc.add_InferenceServiceServicer_to_server,
                       InferenceServicer(service), SERVICE_NAME)
    bound = await server.start()
    runner: web.AppRunner | None = None
    bound_http: int | None = None
    wanted_http = settings.resolved_http_port() if http_port is None else http_port
    if wanted_http is not None and wanted_http >= 0:
        app = OpenAIApp(service, settings.platform, max_body_bytes=settings.http_max_body_bytes).app
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, settings.host, wanted_http)
        await site.start()
        bound_http = runner.addresses[0][1] if runner.addresses else wanted_http
    if metrics:
        start_service_metrics(settings)
    gauges = asyncio.create_task(_refresh_gauges(registry, settings.gauge_interval_s), name="llmo-inference-gauges")
    log.info("inference service started", grpc_port=bound, http_port=bound_http, models=registry.ids(),
             backend=settings.backend, events=bus is not None)
    return RunningInference(settings, registry, service, server, bound, runner, bound_http, bus, gauges, publisher)


async def _refresh_gauges(registry: ModelRegistry, interval_s: float) -> None:
    """Keep the engine gauges (running, waiting, KV usage, prefix hits) current for any /metrics scraper."""
    while True:
        metrics.refresh_gauges(registry)
        await asyncio.sleep(interval_s)


async def serve(settings: InferenceSettings | None = None) -> None:
    """Run until SIGTERM/SIGINT or cancellation, then drain."""
    await serve_until_signal("inference", settings or InferenceSettings(), start)
