"""LLMO native kernels.

``llmo_native`` itself is the CPU module (always importable, no CUDA runtime
needed). The CUDA kernels live in ``llmo_native._cuda``; :func:`cuda_module`
imports it on first use and returns None where it was not built or cannot load.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from llmo_native._C import (
    DTYPE_BF16,
    DTYPE_F16,
    DTYPE_F32,
    attention_rows,
    available_isas,
    batched_lora,
    force_isa,
    get_num_threads,
    int4_dequantize,
    int4_gemm,
    int8_gemm,
    int8_linear,
    int8_max_k,
    int8_pack,
    int8_packed_bytes,
    isa,
    quantize_rows,
    quantize_rows_u7,
    set_num_threads,
    write_kv_cache,
)

__all__ = [
    "DTYPE_BF16",
    "DTYPE_F16",
    "DTYPE_F32",
    "attention_rows",
    "available_isas",
    "batched_lora",
    "cuda_error",
    "cuda_module",
    "force_isa",
    "get_num_threads",
    "int4_dequantize",
    "int4_gemm",
    "int8_gemm",
    "int8_linear",
    "int8_max_k",
    "int8_pack",
    "int8_packed_bytes",
    "isa",
    "quantize_rows",
    "quantize_rows_u7",
    "set_num_threads",
    "write_kv_cache",
]

_cuda: ModuleType | None = None
_cuda_error: str | None = None


def cuda_module() -> ModuleType | None:
    """The CUDA kernel module, or None (see :func:`cuda_error` for why)."""
    global _cuda, _cuda_error
    if _cuda is None and _cuda_error is None:
        try:
            _cuda = importlib.import_module("llmo_native._cuda")
        except ImportError as exc:
            _cuda_error = str(exc)
    return _cuda


def cuda_error() -> str | None:
    return _cuda_error
