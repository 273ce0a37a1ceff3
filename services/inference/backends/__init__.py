"""Backends behind the one inference API: native engine, OpenAI-compatible server, vLLM, TensorRT-LLM."""
