"""``cuda`` backend: ``llmo_native._cuda`` kernels, imported only when a CUDA tensor
shows up. Device pointers, the device index and torch's current stream go to C++;
split-K scratch buffers come from torch's caching allocator."""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from llmo.ops import reference
from llmo.ops.registry import register

# At or above this many rows, dequantize once and let cuBLAS run the dense GEMM.
INT4_DENSE_MIN_ROWS = 64
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@functools.cache
def module() -> ModuleType | None:
    if not torch.cuda.is_available():
        return None
    try:
        import llmo_native
    except ImportError:
        return None
    mod = llmo_native.cuda_module()
    if mod is None or mod.device_count() == 0:
        return None
    return mod


def available() -> bool:
    return module() is not None


def _lib() -> ModuleType:
    mod = module()
    if mod is None:
        raise RuntimeError("llmo_native._cuda is not available (built without nvcc, or no GPU/driver)")
    return mod


def _launch(t: torch.Tensor) -> tuple[int, int]:
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(t.device).cuda_stream


def _attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    row_seq: torch.Tensor,
    row_len: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    lib = _lib()
    q = query.to(torch.float32).contiguous()
    out = torch.empty_like(q)
    tables = block_tables.to(torch.int32).contiguous()
    seqs = row_seq.to(torch.int32).contiguous()
    lens = row_len.to(torch.int32).contiguous()
    _, block_size, kv_heads, head_dim = key_cache.shape
    rows, heads = q.shape[0], q.shape[1]
    # Upper bound from the table width: no device->host sync for the true max length.
    max_len = tables.shape[1] * block_size
    parts = max(1, -(-max_len // lib.PARTITION_SIZE))
    tmp = torch.empty(rows, heads, parts, head_dim, device=q.device) if parts > 1 else out
    maxes = torch.empty(rows, heads, parts, device=q.device) if parts > 1 else out
    sums = torch.empty(rows, heads, parts, device=q.device) if parts > 1 else out
    device, stream = _launch(q)
    lib.paged_attention(
        device, stream, q.data_ptr(), out.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
        _DTYPE_CODE[key_cache.dtype], tables.data_ptr(), seqs.data_ptr(), lens.data_ptr(), rows, heads, kv_heads,
        head_dim, block_size, tables.shape[1], scale, parts, tmp.data_ptr(), maxes.data_ptr(), sums.data_ptr(),
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
    seqs = torch.arange(query.shape[0], dtype=torch.int32, device=query.device)
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
    seqs, lengths = reference.prefill_rows(query_start_loc, context_lens, total=query.shape[0])
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
    device, stream = _launch(key)
    _lib().write_kv_cache(
        device, stream, key.data_ptr(), value.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
        slots.data_ptr(), key.shape[0], kv_heads * head_dim, key_cache.element_size(), num_blocks * block_size,
    )


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.to(torch.float32).contiguous()
    m, k = xf.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scales = torch.empty(m, dtype=torch.float32, device=x.device)
    device, stream = _launch(xf)
    _lib().quantize_rows(device, stream, xf.data_ptr(), q.data_ptr(), scales.data_ptr(), m, k)
    return q, scales


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
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    device, stream = _launch(a)
    _lib().int8_gemm(
        device, stream, a.data_ptr(), b.data_ptr(), a_scales.data_ptr(), b_scales.data_ptr(),
        0 if bias32 is None else bias32.data_ptr(), out.data_ptr(), _DTYPE_CODE[out_dtype], m, n, k,
    )
    return out


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The same u7 asymmetric activation codes as the reference, centred on their zero
    point (``q - zp`` lies in [-127, 127]) and fed to the dp4a W8A8 kernel: the int32
    dot products equal those of the CPU kernel's ``q @ W - zp * rowsum(W)``."""
    q, scales, zero_points = reference.quantize_per_token_u7(x)
    centered = (q.to(torch.int16) - zero_points.to(torch.int16).unsqueeze(-1)).to(torch.int8)
    return int8_gemm(centered.contiguous(), weight, scales.contiguous(), weight_scales, bias, x.dtype)


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
    device, stream = _launch(x)
    if m >= INT4_DENSE_MIN_ROWS:
        w = torch.empty(n, k, dtype=x.dtype, device=x.device)
        _lib().int4_dequantize(
            device, stream, packed.data_ptr(), scales.data_ptr(), _DTYPE_CODE[scales.dtype], zeros.data_ptr(),
            w.data_ptr(), _DTYPE_CODE[x.dtype], n, k, group_size,
        )
        out_dense = x @ w.t()
        return out_dense if bias is None else out_dense + bias.to(x.dtype)
    if packed.data_ptr() % 16:
        packed = packed.clone()  # the kernel reads weights with 16-byte vector loads
    xf = x.to(torch.float32).contiguous()
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    _lib().int4_gemm(
        device, stream, xf.data_ptr(), packed.data_ptr(), scales.data_ptr(), _DTYPE_CODE[scales.dtype],
        zeros.data_ptr(), 0 if bias32 is None else bias32.data_ptr(), out.data_ptr(), m, n, k, group_size,
    )
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def batched_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    scaling: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Shrink into an fp32 ``[N, R]`` scratch (torch's allocator), then expand into ``out``."""
    n, k = x.shape
    slots, rank = lora_a.shape[0], lora_a.shape[1]
    idx = indices if indices.dtype == torch.int64 else indices.to(torch.int64)
    t = torch.empty(n, rank, dtype=torch.float32, device=x.device)
    device, stream = _launch(x)
    _lib().batched_lora(
        device, stream, x.data_ptr(), lora_a.data_ptr(), lora_b.data_ptr(), idx.data_ptr(), scaling.data_ptr(),
        t.data_ptr(), out.data_ptr(), _DTYPE_CODE[x.dtype], n, k, out.shape[1], rank, slots,
    )
    return out


def _on_cuda(*args: object, **kwargs: object) -> bool:
    return all(t.device.type == "cuda" for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))


def _attention_fits(*args: object, **kwargs: object) -> bool:
    key_cache = args[1]
    return _on_cuda(*args, **kwargs) and isinstance(key_cache, torch.Tensor) and key_cache.shape[3] <= 256


def register_cuda() -> None:
    register("paged_attention_decode", "cuda", paged_attention_decode, available, _attention_fits)
    register("chunked_prefill_attention", "cuda", chunked_prefill_attention, available, _attention_fits)
    for name, fn in (
        ("write_kv_cache", write_kv_cache),
        ("quantize_per_token", quantize_per_token),
        ("int8_gemm", int8_gemm),
        ("int8_linear", int8_linear),
        ("int4_gemm", int4_gemm),
        ("batched_lora", batched_lora),
    ):
        register(name, "cuda", fn, available, _on_cuda)
