"""LLMO inference service: native engine (paged KV cache, continuous batching) and serving layers."""
