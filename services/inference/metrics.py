"""Prometheus metrics of the inference service."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from llmo.inference.backends.base import Timings, Usage
from llmo.inference.registry import ModelRegistry

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

RUNNING = Gauge("llmo_inference_requests_running", "Sequences in the running batch", ["model"])
WAITING = Gauge("llmo_inference_requests_waiting", "Requests waiting to be scheduled", ["model"])
KV_USAGE = Gauge("llmo_inference_kv_cache_usage_ratio", "Share of KV blocks in use", ["model"])
PREFIX_HIT = Gauge("llmo_inference_prefix_cache_hit_ratio", "Share of prompt tokens served from the prefix cache",
                   ["model"])
TTFT = Histogram("llmo_inference_time_to_first_token_seconds", "Time to first token", ["model"],
                 buckets=_LATENCY_BUCKETS)
TPOT = Histogram("llmo_inference_time_per_output_token_seconds", "Time per output token after the first",
                 ["model"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
E2E = Histogram("llmo_inference_e2e_request_latency_seconds", "End-to-end request latency", ["model"],
                buckets=_LATENCY_BUCKETS)
QUEUE = Histogram("llmo_inference_queue_time_seconds", "Time waiting before first scheduled", ["model"],
                  buckets=_LATENCY_BUCKETS)
TOKENS = Counter("llmo_inference_tokens_total", "Tokens processed", ["model", "kind"])
REQUESTS = Counter("llmo_inference_requests_total", "Finished requests", ["model", "finish_reason"])


def record_request(model: str, usage: Usage, timings: Timings, finish_reason: str) -> None:
    TTFT.labels(model).observe(timings.ttft_s)
    E2E.labels(model).observe(timings.e2e_s)
    QUEUE.labels(model).observe(timings.queue_s)
    if usage.completion_tokens > 1:
        TPOT.labels(model).observe(timings.tpot_s)
    TOKENS.labels(model, "prompt").inc(usage.prompt_tokens)
    TOKENS.labels(model, "completion").inc(usage.completion_tokens)
    TOKENS.labels(model, "cached_prompt").inc(usage.cached_tokens)
    REQUESTS.labels(model, finish_reason).inc()


def refresh_gauges(registry: ModelRegistry) -> None:
    for backend in registry.all():
        info = backend.info()
        RUNNING.labels(info.model_id).set(info.num_running)
        WAITING.labels(info.model_id).set(info.num_waiting)
        if info.kv_blocks_total:
            KV_USAGE.labels(info.model_id).set(1 - info.kv_blocks_free / info.kv_blocks_total)
        PREFIX_HIT.labels(info.model_id).set(info.prefix_cache_hit_rate)
