"""The native engine: paged KV cache, continuous batching scheduler, sampler."""
