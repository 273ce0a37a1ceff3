"""Every knob of the inference service (`LLMO_INFERENCE_*`)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from llmo.core.http_edge import DEFAULT_MAX_BODY_BYTES
from llmo.core.settings import DEFAULT_HTTP_PORTS, ServiceSettings


class InferenceSettings(ServiceSettings):
    service: ClassVar[str] = "inference"

    # OpenAI-compatible HTTP; 0 picks 8000, -1 disables it.
    http_port: int = 0
    # Largest HTTP request body accepted (bytes); larger ones get 413 BODY_TOO_LARGE.
    http_max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    backend: Literal["native", "openai", "vllm", "tensorrt_llm"] = "native"
    # Served model id (what clients put in `model`).
    model_name: str = "llmo-demo"
    # Local Hugging Face directory; empty serves the bundled demo model.
    model_path: str = ""
    # float32 / bfloat16 / float16; empty uses the checkpoint's dtype.
    dtype: str = ""
    # cpu, cuda or auto (cuda when a GPU is visible).
    device: str = "auto"
    # none / int8 / int4 (native backend; quantized at load time via llmo.quant).
    quantization: Literal["none", "int8", "int4"] = "none"
    # Engine: KV cache and batching.
    block_size: int = 16
    num_kv_blocks: int = 1024
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_queue: int = 256
    enable_prefix_caching: bool = True
    # LoRA adapters served beside the native model, in one batch with the base (0 turns adapters off).
    max_adapters: int = Field(default=8, ge=0, le=256)
    # Largest adapter rank a slot holds (lower ranks are zero-padded to it: each slot's compute is this rank's).
    max_adapter_rank: int = Field(default=16, ge=1, le=256)
    # The adapter slots (max_adapters x max_adapter_rank over the seven projections of every layer) must fit
    # in this many MiB, or the service refuses to start and says how much they need.
    adapter_memory_mb: int = Field(default=1024, ge=1)
    # LoadAdapter reads adapters from under this directory only; empty: `<data_dir>/adapters`.
    adapter_dir: str = ""
    # Adapters served from start, name -> PEFT adapter directory (operator config: any path),
    # e.g. LLMO_INFERENCE_ADAPTERS='{"math": "/models/math-lora"}'.
    adapters: dict[str, str] = Field(default_factory=dict)
    # CPU threads torch may use (0 leaves torch's default).
    torch_threads: int = 0
    # openai backend: any OpenAI-compatible server.
    openai_base_url: str = ""
    openai_api_key: str = ""
    # Upstream model name; empty uses model_name.
    openai_model: str = ""
    openai_timeout_s: float = 120.0
    # Seconds between refreshes of the engine gauges on /metrics.
    gauge_interval_s: float = 1.0
    # Publish llmo.inference.v1.completed on NATS.
    publish_events: bool = True
    # Share of llmo.inference.v1.completed events that carry their content (the last user message or
    # the prompt, and the first choice's text, each cut to 16 KiB) for online evaluation; chosen by a
    # hash of the request id. 0 (the default) keeps user text off the bus; `llmo up` sets 1.
    event_content_sample: float = Field(default=0.0, ge=0.0, le=1.0)

    def resolved_http_port(self) -> int | None:
        if self.http_port < 0:
            return None
        return self.http_port or DEFAULT_HTTP_PORTS["inference"]
