"""Public op functions: validate arguments, then dispatch through the registry."""

from __future__ import annotations

import math
from typing import Any

import torch

from llmo.ops import checks, reference
from llmo.ops.int4_layout import CHUNK, GROUP_SIZES
from llmo.ops.registry import define, get_op

_paged_decode = define("paged_attention_decode", reference.paged_attention_decode)
_prefill = define("chunked_prefill_attention", reference.chunked_prefill_attention)
_write_kv = define("write_kv_cache", reference.write_kv_cache)
_quant_tok = define("quantize_per_token", reference.quantize_per_token)
_int8_gemm = define("int8_gemm", reference.int8_gemm)
_int8_linear = define("int8_linear", reference.int8_linear)
_int4_gemm = define("int4_gemm", reference.int4_gemm)
_rms_norm = define("rms_norm", reference.rms_norm)
_rotary = define("rotary_embedding", reference.rotary_embedding)
_silu_mul = define("silu_and_mul", reference.silu_and_mul)
_lora = define("batched_lora", reference.batched_lora)

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# int8_linear accumulates in int32: K * 127 * 128 must stay below 2^31.
INT8_MAX_K = 131072
# The native CPU attention checks block-table indices itself, as batched_lora does
# its slot indices (far cheaper than the equivalent torch ops on the decode hot path).
NATIVE_CHECKED = "cpu"


def selected_backend(op: str, *args: Any, **kwargs: Any) -> str:
    """Name of the backend a call to ``op`` with these arguments would run on."""
    return get_op(op).select(*args, **kwargs)


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode step: ``query[B, H, D]`` attends to the first ``context_lens[b]`` cached
    tokens of sequence ``b``. Returns ``[B, H, D]`` in the query dtype (zeros where the
    context is empty)."""
    num_blocks, block_size, kv_heads, head_dim = checks.kv_cache(key_cache, value_cache)
    checks.attention_query(query, kv_heads, head_dim)
    batch = query.shape[0]
    checks.block_table(block_tables, batch)
    checks.lengths("context_lens", context_lens, batch)
    checks.same_device(query=query, key_cache=key_cache, block_tables=block_tables, context_lens=context_lens)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    args = (query.contiguous(), key_cache, value_cache, block_tables, context_lens, scale)
    backend, impl = _paged_decode.dispatch(*args)
    if backend != NATIVE_CHECKED:
        checks.used_blocks(block_tables, context_lens, block_size, num_blocks)
    return impl(*args)  # type: ignore[no-any-return]


def chunked_prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention for packed new tokens ``query[T, H, D]``.

    Sequence ``b`` owns query rows ``query_start_loc[b]:query_start_loc[b+1]``; its K/V
    (cached prefix *and* the new tokens, written first with :func:`write_kv_cache`) fill
    the first ``context_lens[b]`` cache slots. New token ``i`` sits at position
    ``context_lens[b] - q_len_b + i`` and sees every position up to its own.
    """
    num_blocks, block_size, kv_heads, head_dim = checks.kv_cache(key_cache, value_cache)
    checks.attention_query(query, kv_heads, head_dim)
    checks.tensor("query_start_loc", query_start_loc)
    checks.dims("query_start_loc", query_start_loc, 1)
    checks.dtype_in("query_start_loc", query_start_loc, checks.INDEX_DTYPES)
    batch = query_start_loc.shape[0] - 1
    if batch < 0:
        raise ValueError("query_start_loc needs at least one entry")
    checks.block_table(block_tables, batch)
    checks.lengths("context_lens", context_lens, batch)
    checks.same_device(
        query=query, key_cache=key_cache, block_tables=block_tables,
        context_lens=context_lens, query_start_loc=query_start_loc,
    )
    if checks.host_checked(query_start_loc):
        starts = query_start_loc.long()
        qlens = starts[1:] - starts[:-1]
        if int(starts[0]) != 0 or int(starts[-1]) != query.shape[0] or (qlens.numel() and int(qlens.min()) < 0):
            raise ValueError(f"query_start_loc must rise from 0 to the number of query tokens ({query.shape[0]})")
        if qlens.numel() and bool((qlens > context_lens.long()).any()):
            raise ValueError("a sequence has more new tokens than context_lens (write new K/V to the cache first)")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    args = (query.contiguous(), key_cache, value_cache, block_tables, context_lens, query_start_loc, scale)
    backend, impl = _prefill.dispatch(*args)
    if backend != NATIVE_CHECKED:
        checks.used_blocks(block_tables, context_lens, block_size, num_blocks)
    return impl(*args)  # type: ignore[no-any-return]


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``key/value[T, Hkv, D]`` at flat slots ``slot_mapping[T]``
    (slot = block * block_size + offset; negative slots are padding and skipped)."""
    num_blocks, block_size, kv_heads, head_dim = checks.kv_cache(key_cache, value_cache)
    for name, t in (("key", key), ("value", value)):
        checks.tensor(name, t)
        checks.dims(name, t, 3)
        checks.shape_eq(name, t.shape[1:], (kv_heads, head_dim))
        if t.dtype != key_cache.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must match the cache dtype {key_cache.dtype}")
    checks.shape_eq("value", value.shape, key.shape)
    checks.tensor("slot_mapping", slot_mapping)
    checks.dims("slot_mapping", slot_mapping, 1)
    checks.dtype_in("slot_mapping", slot_mapping, checks.INDEX_DTYPES)
    checks.shape_eq("slot_mapping", slot_mapping.shape, (key.shape[0],))
    checks.same_device(key=key, value=value, key_cache=key_cache, slot_mapping=slot_mapping)
    if checks.host_checked(slot_mapping) and slot_mapping.numel():
        if int(slot_mapping.max()) >= num_blocks * block_size:
            raise ValueError(f"slot_mapping entries must be < {num_blocks * block_size} (cache slots)")
    _write_kv(key.contiguous(), value.contiguous(), key_cache, value_cache, slot_mapping)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic INT8 quantization per row: ``x ≈ q * scale[:, None]``."""
    checks.tensor("x", x)
    checks.dims("x", x, 2)
    checks.dtype_in("x", x, checks.FLOAT_DTYPES)
    result: tuple[torch.Tensor, torch.Tensor] = _quant_tok(x.contiguous())
    return result


def int8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scales: torch.Tensor,
    b_scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W8A8: ``(a[M,K] @ b[N,K]^T) * a_scales[M,None] * b_scales[None,N] + bias``."""
    for name, t in (("a", a), ("b", b)):
        checks.tensor(name, t)
        checks.dims(name, t, 2)
        checks.dtype_in(name, t, (torch.int8,))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    m, n = a.shape[0], b.shape[0]
    checks.tensor("a_scales", a_scales)
    checks.tensor("b_scales", b_scales)
    checks.shape_eq("a_scales", a_scales.shape, (m,))
    checks.shape_eq("b_scales", b_scales.shape, (n,))
    checks.dtype_in("a_scales", a_scales, (torch.float32,))
    checks.dtype_in("b_scales", b_scales, (torch.float32,))
    if bias is not None:
        checks.tensor("bias", bias)
        checks.shape_eq("bias", bias.shape, (n,))
        checks.dtype_in("bias", bias, checks.FLOAT_DTYPES)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    checks.same_device(a=a, b=b, a_scales=a_scales, b_scales=b_scales, bias=bias)
    if checks.host_checked(a) and a.numel() and int(a.min()) == -128:
        raise ValueError("a (activations) must lie in [-127, 127]; quantize_per_token guarantees this")
    return _int8_gemm(  # type: ignore[no-any-return]
        a.contiguous(), b.contiguous(), a_scales.contiguous(), b_scales.contiguous(), bias, out_dtype
    )


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 linear: ``x[..., K]`` quantized per token to asymmetric 7-bit codes
    (``x ≈ (q - zp) * s``, q in 0..127), times the symmetric int8 ``weight[N, K]``
    (``W ≈ weight * weight_scales[:, None]``); returns ``[..., N]`` in x's dtype.

    The CPU backend packs ``weight`` once into a register-blocked layout and keeps it
    on the tensor (repacked if the tensor is modified in place); pass the same
    tensor on every call."""
    checks.tensor("x", x)
    checks.dtype_in("x", x, checks.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x needs at least one dimension")
    checks.tensor("weight", weight)
    checks.dims("weight", weight, 2)
    checks.dtype_in("weight", weight, (torch.int8,))
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features but weight is {tuple(weight.shape)}")
    if k == 0 or n == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    if k > INT8_MAX_K:
        raise ValueError(f"int8_linear supports K <= {INT8_MAX_K} (int32 accumulators), got K={k}")
    checks.tensor("weight_scales", weight_scales)
    checks.shape_eq("weight_scales", weight_scales.shape, (n,))
    checks.dtype_in("weight_scales", weight_scales, (torch.float32,))
    if bias is not None:
        checks.tensor("bias", bias)
        checks.shape_eq("bias", bias.shape, (n,))
        checks.dtype_in("bias", bias, checks.FLOAT_DTYPES)
    checks.same_device(x=x, weight=weight, weight_scales=weight_scales, bias=bias)
    lead = x.shape[:-1]
    out = _int8_linear(x.reshape(-1, k).contiguous(), weight.contiguous(), weight_scales.contiguous(), bias)
    return out.reshape(*lead, n)  # type: ignore[no-any-return]


def int4_gemm(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight-only INT4: ``x[M, K] @ dequant(packed_w)^T (+ bias)`` -> ``[M, N]`` in x's dtype.
    Weights use the ``llmo-int4-v1`` layout (see :mod:`llmo.ops.int4_layout`)."""
    checks.tensor("x", x)
    checks.dims("x", x, 2)
    checks.dtype_in("x", x, checks.FLOAT_DTYPES)
    checks.tensor("packed_w", packed_w)
    checks.dims("packed_w", packed_w, 2)
    checks.dtype_in("packed_w", packed_w, (torch.uint8,))
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    k = x.shape[1]
    n = packed_w.shape[0]
    if k % CHUNK or k % group_size:
        raise ValueError(f"K={k} must be a multiple of {CHUNK} and of group_size={group_size}")
    checks.shape_eq("packed_w", packed_w.shape, (n, k // 2))
    checks.tensor("scales", scales)
    checks.tensor("zeros", zeros)
    checks.shape_eq("scales", scales.shape, (n, k // group_size))
    checks.shape_eq("zeros", zeros.shape, (n, k // group_size))
    checks.dtype_in("scales", scales, checks.FLOAT_DTYPES)
    checks.dtype_in("zeros", zeros, (torch.uint8,))
    if bias is not None:
        checks.tensor("bias", bias)
        checks.shape_eq("bias", bias.shape, (n,))
        checks.dtype_in("bias", bias, checks.FLOAT_DTYPES)
    checks.same_device(x=x, packed_w=packed_w, scales=scales, zeros=zeros, bias=bias)
    return _int4_gemm(  # type: ignore[no-any-return]
        x.contiguous(), packed_w.contiguous(), scales.contiguous(), zeros.contiguous(), group_size, bias
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dimension."""
    checks.tensor("x", x)
    checks.tensor("weight", weight)
    checks.dtype_in("x", x, checks.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x needs at least one dimension")
    checks.shape_eq("weight", weight.shape, (x.shape[-1],))
    checks.same_device(x=x, weight=weight)
    return _rms_norm(x.contiguous(), weight.contiguous(), float(eps))  # type: ignore[no-any-return]


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX rotary embedding. ``query[T, H, D]``, ``key[T, Hkv, D]``, ``positions[T]``,
    ``cos_sin_cache[max_pos, rot_dim]`` = cos (first half) | sin (second half).
    Returns rotated copies."""
    checks.tensor("positions", positions)
    checks.dims("positions", positions, 1)
    checks.dtype_in("positions", positions, checks.INDEX_DTYPES)
    for name, t in (("query", query), ("key", key)):
        checks.tensor(name, t)
        checks.dims(name, t, 3)
        checks.dtype_in(name, t, checks.FLOAT_DTYPES)
        if t.shape[0] != positions.shape[0]:
            raise ValueError(f"{name} has {t.shape[0]} tokens but positions has {positions.shape[0]}")
    if key.shape[2] != query.shape[2]:
        raise ValueError("query and key head_dim differ")
    checks.tensor("cos_sin_cache", cos_sin_cache)
    checks.dims("cos_sin_cache", cos_sin_cache, 2)
    checks.dtype_in("cos_sin_cache", cos_sin_cache, checks.FLOAT_DTYPES)
    rot_dim = cos_sin_cache.shape[1]
    if rot_dim % 2 or rot_dim > query.shape[2] or rot_dim == 0:
        raise ValueError(f"rotary dim {rot_dim} must be even, positive and <= head_dim {query.shape[2]}")
    checks.same_device(positions=positions, query=query, key=key, cos_sin_cache=cos_sin_cache)
    if checks.host_checked(positions) and positions.numel():
        if int(positions.min()) < 0 or int(positions.max()) >= cos_sin_cache.shape[0]:
            raise ValueError(f"positions must lie in [0, {cos_sin_cache.shape[0]})")
    result: tuple[torch.Tensor, torch.Tensor] = _rotary(
        positions.contiguous(), query.contiguous(), key.contiguous(), cos_sin_cache.contiguous()
    )
    return result


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x[..., 2d]``."""
    checks.tensor("x", x)
    checks.dtype_in("x", x, checks.FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"last dimension must be even, got shape {tuple(x.shape)}")
    return _silu_mul(x.contiguous())  # type: ignore[no-any-return]


def batched_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    scaling: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Multi-adapter LoRA (S-LoRA / Punica): for every row ``i`` with ``s = indices[i] >= 0``,
    ``out[i] += scaling[s] * lora_b[s] @ (lora_a[s] @ x[i])``, accumulated in fp32; rows with
    index -1 are left alone. Updates ``out`` in place and returns it.

    ``x[N, K]``, ``lora_a[S, R, K]``, ``lora_b[S, M, R]`` and ``out[N, M]`` share one float
    dtype (adapters of a lower rank are zero-padded to R); ``indices[N]`` int64 (or int32),
    ``scaling[S]`` float32. ``out`` must be contiguous; the other inputs are made so."""
    checks.tensor("x", x)
    checks.dims("x", x, 2)
    checks.dtype_in("x", x, checks.FLOAT_DTYPES)
    n, k = x.shape
    checks.tensor("lora_a", lora_a)
    checks.dims("lora_a", lora_a, 3)
    slots, rank = lora_a.shape[0], lora_a.shape[1]
    if lora_a.shape[2] != k:
        raise ValueError(f"lora_a must be [S, R, K] with K = {k} (x's features), got shape {tuple(lora_a.shape)}")
    checks.tensor("lora_b", lora_b)
    checks.dims("lora_b", lora_b, 3)
    m = lora_b.shape[1]
    if lora_b.shape[0] != slots or lora_b.shape[2] != rank:
        raise ValueError(
            f"lora_b must be [S, M, R] = [{slots}, M, {rank}] to match lora_a {tuple(lora_a.shape)}, "
            f"got shape {tuple(lora_b.shape)}"
        )
    checks.tensor("indices", indices)
    checks.dims("indices", indices, 1)
    checks.dtype_in("indices", indices, checks.INDEX_DTYPES)
    checks.shape_eq("indices", indices.shape, (n,))
    checks.tensor("scaling", scaling)
    checks.shape_eq("scaling", scaling.shape, (slots,))
    checks.dtype_in("scaling", scaling, (torch.float32,))
    checks.tensor("out", out)
    checks.shape_eq("out", out.shape, (n, m))
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b), ("out", out)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must match x dtype {x.dtype}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (it is updated in place)")
    checks.same_device(x=x, lora_a=lora_a, lora_b=lora_b, indices=indices, scaling=scaling, out=out)
    args = (x.contiguous(), lora_a.contiguous(), lora_b.contiguous(), indices.contiguous(), scaling.contiguous(), out)
    backend, impl = _lora.dispatch(*args)
    if backend != NATIVE_CHECKED and checks.host_checked(indices) and n:
        lo, hi = torch.aminmax(indices)
        if int(lo) < -1 or int(hi) >= slots:
            raise ValueError(f"indices must lie in [-1, {slots}) (the adapter slots), got [{int(lo)}, {int(hi)}]")
    return impl(*args)  # type: ignore[no-any-return]
