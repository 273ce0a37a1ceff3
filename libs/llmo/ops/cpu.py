"""``cpu`` backend: the ``llmo_native`` C++ kernels (AVX2 / AVX-512 VNNI / portable).

Tensors reach C++ as raw addresses; these wrappers make them contiguous, convert
activations to fp32 where the kernels expect it, and keep every buffer alive
for the duration of the call. Arguments were validated by :mod:`llmo.ops.api`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import torch

from llmo.ops import reference
from llmo.ops.registry import register

# From this many activation rows on, dequantize + dense GEMM (torch's BLAS)
# beats the AVX2 and generic INT4 kernels (measured on a Zen 1 VM). The AVX-512
# VNNI kernel beats it at every M (on the Zen 5 VM 2.5-25x at M = 16..256, fp32
# or bf16 activations: dequantizing alone costs more than the whole kernel),
# so that table never takes the dense path.
INT4_DENSE_MIN_ROWS = 48
INT4_KERNEL_ONLY_ISAS = frozenset({"avx512vnni"})

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@functools.cache
def _module() -> ModuleType | None:
    try:
        import llmo_native
    except ImportError:
        return None
    return llmo_native


_threads_synced = 0


def native() -> ModuleType | None:
    """The ``llmo_native`` module (None when it is not built), running as many
    threads as torch: a change of ``torch.set_num_threads`` reaches it at the next call."""
    global _threads_synced
    lib = _module()
    if lib is not None:
        threads = torch.get_num_threads()
        if threads != _threads_synced:  # checked per op call: one int compare when unchanged
            lib.set_num_threads(max(1, threads))
            _threads_synced = threads
    return lib


def available() -> bool:
    return _module() is not None


def _lib() -> ModuleType:
    lib = native()
    if lib is None:
        raise RuntimeError("llmo_native is not installed (build it with `make native`)")
    return lib


def _attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    row_seq: torch.Tensor,
    row_len: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    q = query.to(torch.float32).contiguous()
    out = torch.empty_like(q)
    tables = block_tables.to(torch.int32).contiguous()
    seqs = row_seq.to(torch.int32).contiguous()
    lens = row_len.to(torch.int32).contiguous()
    num_blocks, block_size, kv_heads, head_dim = key_cache.shape
    # The native side validates every table entry and length it will follow.
    _lib().attention_rows(
        q.data_ptr(), out.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), _DTYPE_CODE[key_cache.dtype],
        tables.data_ptr(), seqs.data_ptr(), lens.data_ptr(), q.shape[0], q.shape[1], kv_heads, head_dim,
        block_size, tables.shape[1], scale, tables.shape[0], num_blocks,
    )
    return out.to(query.dtype)


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    seqs = torch.arange(query.shape[0], dtype=torch.int32)
    return _attention(query, key_cache, value_cache, block_tables, seqs, context_lens, scale)


def chunked_prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    seqs, lengths = reference.prefill_rows(query_start_loc, context_lens)
    return _attention(query, key_cache, value_cache, block_tables, seqs, lengths, scale)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    slots = slot_mapping.to(torch.int64).contiguous()
    num_blocks, block_size, kv_heads, head_dim = key_cache.shape
    row_bytes = kv_heads * head_dim * key_cache.element_size()
    _lib().write_kv_cache(
        key.data_ptr(), value.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), slots.data_ptr(),
        key.shape[0], row_bytes, num_blocks * block_size,
    )


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.to(torch.float32).contiguous()
    m, k = xf.shape
    q = torch.empty(m, k, dtype=torch.int8)
    scales = torch.empty(m, dtype=torch.float32)
    _lib().quantize_rows(xf.data_ptr(), q.data_ptr(), scales.data_ptr(), m, k)
    return q, scales


def _bias32(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.to(torch.float32).contiguous()


def int8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scales: torch.Tensor,
    b_scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    bias32 = _bias32(bias)
    _lib().int8_gemm(
        a.data_ptr(), b.data_ptr(), a_scales.data_ptr(), b_scales.data_ptr(),
        0 if bias32 is None else bias32.data_ptr(), out.data_ptr(), m, n, k,
    )
    return out if out_dtype == torch.float32 else out.to(out_dtype)


@dataclass(frozen=True)
class PackedInt8:
    """An int8 ``[N, K]`` weight in the kernel's register-blocked layout plus its row
    sums (for the activation zero points); ``version``/``address`` identify the
    tensor contents it was built from."""

    packed: torch.Tensor
    row_sums: torch.Tensor
    version: int
    address: int


_PACK_ATTR = "_llmo_int8_packed"


def pack_int8(weight: torch.Tensor) -> PackedInt8:
    """Pack ``weight`` for :func:`int8_linear` (done once per weight, then cached on it)."""
    n, k = weight.shape
    lib = _lib()
    packed = torch.empty(lib.int8_packed_bytes(n, k), dtype=torch.int8)
    row_sums = torch.empty(n, dtype=torch.int32)
    lib.int8_pack(weight.data_ptr(), packed.data_ptr(), row_sums.data_ptr(), n, k)
    return PackedInt8(packed, row_sums, _version(weight), weight.data_ptr())


def _version(t: torch.Tensor) -> int:
    # Inference-mode tensors have no version counter (in-place updates go unseen there).
    return -1 if t.is_inference() else t._version


def packed_int8(weight: torch.Tensor) -> PackedInt8:
    """The cached packing of ``weight``; rebuilt when the tensor was modified in place."""
    cached: PackedInt8 | None = getattr(weight, _PACK_ATTR, None)
    if cached is not None and cached.version == _version(weight) and cached.address == weight.data_ptr():
        return cached
    fresh = pack_int8(weight)
    setattr(weight, _PACK_ATTR, fresh)
    return fresh


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    pw = packed_int8(weight)
    xf = x if x.dtype == torch.float32 else x.float()
    out = torch.empty(m, n, dtype=torch.float32)
    bias32 = _bias32(bias)
    _lib().int8_linear(
        xf.data_ptr(), pw.packed.data_ptr(), pw.row_sums.data_ptr(), weight_scales.data_ptr(),
        0 if bias32 is None else bias32.data_ptr(), out.data_ptr(), m, n, k,
    )
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def int4_dequantize(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Dense ``[N, K]`` weight in fp32 or bf16 from the packed layout (multithreaded)."""
    n = packed.shape[0]
    k = packed.shape[1] * 2
    out_dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    w = torch.empty(n, k, dtype=out_dtype)
    _lib().int4_dequantize(
        packed.data_ptr(), scales.data_ptr(), _DTYPE_CODE[scales.dtype], zeros.data_ptr(), w.data_ptr(),
        _DTYPE_CODE[out_dtype], n, k, group_size,
    )
    return w if out_dtype == dtype else w.to(dtype)


def int4_gemm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    m, k = x.shape
    n = packed.shape[0]
    if m >= INT4_DENSE_MIN_ROWS and _lib().isa() not in INT4_KERNEL_ONLY_ISAS:
        w = int4_dequantize(packed, scales, zeros, group_size, x.dtype)
        out_dense = x @ w.t()
        return out_dense if bias is None else out_dense + bias.to(x.dtype)
    xf = x if x.dtype == torch.float32 else x.float()
    out = torch.empty(m, n, dtype=torch.float32)
    bias32 = _bias32(bias)
    _lib().int4_gemm(
        xf.data_ptr(), packed.data_ptr(), scales.data_ptr(), _DTYPE_CODE[scales.dtype], zeros.data_ptr(),
        0 if bias32 is None else bias32.data_ptr(), out.data_ptr(), m, n, k, group_size,
    )
    return out if x.dtype == torch.float32 else out.to(x.dtype)


# The native LoRA kernel reads and writes fp32 or bf16 (fp16 runs the reference).
LORA_DTYPES = (torch.float32, torch.bfloat16)


def batched_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    scaling: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    idx = indices if indices.dtype == torch.int64 else indices.to(torch.int64)
    n, k = x.shape
    slots, rank = lora_a.shape[0], lora_a.shape[1]
    # The native side checks every slot index while it groups the rows.
    _lib().batched_lora(
        x.data_ptr(), lora_a.data_ptr(), lora_b.data_ptr(), idx.data_ptr(), scaling.data_ptr(), out.data_ptr(),
        _DTYPE_CODE[x.dtype], n, k, out.shape[1], rank, slots,
    )
    return out


def _lora_fits(x: torch.Tensor, *args: object, **kwargs: object) -> bool:
    return x.dtype in LORA_DTYPES and _on_cpu(x, *args, **kwargs)


def _on_cpu(*args: object, **kwargs: object) -> bool:
    for value in args:
        if isinstance(value, torch.Tensor) and not value.is_cpu:
            return False
    return all(value.is_cpu for value in kwargs.values() if isinstance(value, torch.Tensor))


def register_cpu() -> None:
    for name, fn in (
        ("paged_attention_decode", paged_attention_decode),
        ("chunked_prefill_attention", chunked_prefill_attention),
        ("write_kv_cache", write_kv_cache),
        ("quantize_per_token", quantize_per_token),
        ("int8_gemm", int8_gemm),
        ("int8_linear", int8_linear),
        ("int4_gemm", int4_gemm),
    ):
        register(name, "cpu", fn, available, _on_cpu)
    register("batched_lora", "cpu", batched_lora, available, _lora_fits)
