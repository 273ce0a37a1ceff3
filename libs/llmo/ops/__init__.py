"""LLMO kernel ops behind one registry.

Every op has a pure PyTorch reference (the ``reference`` backend and test
oracle) plus overrides: ``cpu`` (the ``llmo_native`` C++ module: AVX2 /
AVX-512 VNNI picked at run time, OpenMP), ``cuda`` (``llmo_native._cuda``,
loaded only when a CUDA tensor shows up) and ``triton``. The platform object
orders the backends per device; :func:`selected_backend` tells which one a
call would use. ``LLMO_OPS_BACKEND=reference`` (read when ``llmo.ops`` is imported) forces the reference everywhere.

KV cache layout (paged):

* ``key_cache`` / ``value_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``,
  contiguous, fp32 / bf16 / fp16, block_size in {8, 16, 32}.
* A token of a sequence lives in slot ``block_tables[seq, pos // block_size] *
  block_size + pos % block_size``; :func:`write_kv_cache` takes these flat slots
  (``slot_mapping``, negative = padding, skipped).
* ``block_tables[B, max_blocks]`` int32/int64; entries past a sequence's
  context are ignored. ``context_lens[B]`` counts cached tokens per sequence.
* Query heads ``H`` must be a multiple of ``num_kv_heads`` (MHA, GQA, MQA).

LoRA adapter stacks (:func:`batched_lora`): ``lora_a[S, R, K]``, ``lora_b[S, M, R]``
(lower ranks zero-padded to R), ``scaling[S]`` fp32, one slot index per token row
(-1: no adapter); the delta is added to ``out[N, M]`` in place.

Index ranges are validated for CPU tensors; CUDA callers must pass valid
indices (checking them would synchronise the GPU on every call).
"""

from llmo.ops import backends as _backends
from llmo.ops.api import (
    INT8_MAX_K,
    batched_lora,
    chunked_prefill_attention,
    int4_gemm,
    int8_gemm,
    int8_linear,
    paged_attention_decode,
    quantize_per_token,
    rms_norm,
    rotary_embedding,
    selected_backend,
    silu_and_mul,
    write_kv_cache,
)
from llmo.ops.int4_layout import dequantize_int4, pack_int4, quantize_int4, unpack_int4
from llmo.ops.platform import Platform, current_platform
from llmo.ops.registry import force_backend, get_op, op_names

_backends.register_all()

__all__ = [
    "INT8_MAX_K",
    "Platform",
    "batched_lora",
    "chunked_prefill_attention",
    "current_platform",
    "dequantize_int4",
    "force_backend",
    "get_op",
    "int4_gemm",
    "int8_gemm",
    "int8_linear",
    "op_names",
    "pack_int4",
    "paged_attention_decode",
    "quantize_int4",
    "quantize_per_token",
    "rms_norm",
    "rotary_embedding",
    "selected_backend",
    "silu_and_mul",
    "unpack_int4",
    "write_kv_cache",
]
