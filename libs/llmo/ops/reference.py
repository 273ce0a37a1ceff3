"""Pure PyTorch reference implementations: the ``reference`` backend and the test oracle.

They favour clarity over speed and compute in fp32. Inputs are assumed
validated by :mod:`llmo.ops.checks`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmo.ops.int4_layout import dequantize_int4


def attention_rows(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    row_seq: torch.Tensor,
    row_len: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of query row ``r`` (``[R, H, D]``) over the first ``row_len[r]``
    cached tokens of sequence ``row_seq[r]``. Rows with length 0 give zeros."""
    rows, heads, dim = query.shape
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = heads // kv_heads
    out = torch.zeros(rows, heads, dim, dtype=torch.float32, device=query.device)
    for r in range(rows):
        length = int(row_len[r])
        if length == 0:
            continue
        nblocks = (length + block_size - 1) // block_size
        blocks = block_tables[int(row_seq[r]), :nblocks].long()
        k = key_cache[blocks].reshape(-1, kv_heads, dim)[:length].to(torch.float32)
        v = value_cache[blocks].reshape(-1, kv_heads, dim)[:length].to(torch.float32)
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        q = query[r].to(torch.float32)
        scores = torch.einsum("hd,thd->ht", q, k) * scale
        probs = torch.softmax(scores, dim=-1)
        out[r] = torch.einsum("ht,thd->hd", probs, v)
    return out.to(query.dtype)


def prefill_rows(
    query_start_loc: torch.Tensor, context_lens: torch.Tensor, total: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map each packed prefill query token to (sequence index, visible length).
    ``total`` (the number of query tokens) spares a device sync on GPUs."""
    starts = query_start_loc.long()
    qlens = starts[1:] - starts[:-1]
    seqs = torch.repeat_interleave(torch.arange(qlens.numel(), device=starts.device), qlens, output_size=total)
    offset = torch.arange(seqs.numel(), device=starts.device) - starts[:-1][seqs]
    lengths = context_lens.long()[seqs] - qlens[seqs] + offset + 1
    return seqs.to(torch.int32), lengths.to(torch.int32)


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    seqs = torch.arange(query.shape[0], dtype=torch.int32, device=query.device)
    return attention_rows(query, key_cache, value_cache, block_tables, seqs, context_lens, scale)


def chunked_prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    seqs, lengths = prefill_rows(query_start_loc, context_lens)
    return attention_rows(query, key_cache, value_cache, block_tables, seqs, lengths, scale)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    block_size = key_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key[valid].to(key_cache.dtype)
    value_cache[blocks, offsets] = value[valid].to(value_cache.dtype)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.to(torch.float32)
    absmax = xf.abs().amax(dim=-1)
    scales = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(xf * (1.0 / scales).unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scales


# int8_linear activation codes: 7 bits, so an unsigned code times a signed int8
# weight pair-summed (x86 vpmaddubsw) stays inside int16.
ACT_CODE_MAX = 127


def quantize_per_token_u7(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric dynamic quantization per row to codes 0..127:
    ``x ≈ (q - zero_point[:, None]) * scale[:, None]``; the range always covers 0.
    Returns ``(q uint8, scale float32, zero_point int32)``; fp32 arithmetic that the
    native kernels reproduce bit for bit."""
    xf = x.to(torch.float32)
    lo = xf.amin(dim=-1).clamp(max=0.0)
    hi = xf.amax(dim=-1).clamp(min=0.0)
    scales = (hi - lo) / float(ACT_CODE_MAX)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    inv = 1.0 / scales
    zero_points = torch.round(-lo * inv).clamp(0, ACT_CODE_MAX)
    q = (torch.round(xf * inv.unsqueeze(-1)) + zero_points.unsqueeze(-1)).clamp(0, ACT_CODE_MAX)
    return q.to(torch.uint8), scales, zero_points.to(torch.int32)


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x[M, K]`` quantized per token (:func:`quantize_per_token_u7`), times the int8
    weight ``[N, K]``: ``(q - zp) @ weight^T * scale * weight_scales + bias`` in x's dtype."""
    q, scales, zero_points = quantize_per_token_u7(x)
    centered = (q.to(torch.int16) - zero_points.to(torch.int16).unsqueeze(-1)).to(torch.int8)
    return int8_gemm(centered, weight, scales, weight_scales, bias, x.dtype)


def int8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scales: torch.Tensor,
    b_scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    # fp64 keeps the int32 dot products exact for K up to ~2^37.
    acc = a.to(torch.float64) @ b.to(torch.float64).t()
    out = acc * a_scales.to(torch.float64).unsqueeze(1) * b_scales.to(torch.float64).unsqueeze(0)
    out = out.to(torch.float32)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def int4_gemm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    w = dequantize_int4(packed, scales, zeros, group_size)
    out = x.to(torch.float32) @ w.t()
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.float32)
    var = xf.pow(2).mean(dim=-1, keepdim=True)
    return (xf * torch.rsqrt(var + eps) * weight.to(torch.float32)).to(x.dtype)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style rotary (rotate halves) over the first ``rot_dim`` channels."""
    rot_dim = cos_sin_cache.shape[1]
    half = rot_dim // 2
    cs = cos_sin_cache[positions.long()].to(torch.float32)
    cos, sin = cs[:, :half].unsqueeze(1), cs[:, half:].unsqueeze(1)

    def rotate(t: torch.Tensor) -> torch.Tensor:
        tf = t.to(torch.float32)
        x1, x2 = tf[..., :half], tf[..., half:rot_dim]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, tf[..., rot_dim:]], dim=-1)
        return rotated.to(t.dtype)

    return rotate(query), rotate(key)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    xf = x.to(torch.float32)
    return (F.silu(xf[..., :d]) * xf[..., d:]).to(x.dtype)


def batched_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    scaling: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """One adapter at a time: for each slot present, its rows' ``scaling * (x A^T) B^T``
    (fp32) is added to ``out`` in place. Rows with index -1 are left alone."""
    idx = indices.long()
    for slot in torch.unique(idx).tolist():
        if slot < 0:
            continue
        rows = (idx == slot).nonzero().squeeze(1)
        shrunk = (x.index_select(0, rows).float() @ lora_a[slot].float().t()) * scaling[slot]
        delta = shrunk @ lora_b[slot].float().t()
        if out.dtype == torch.float32:
            out.index_add_(0, rows, delta)
        else:  # index_add_ would round the delta to out's dtype before adding it
            out.index_copy_(0, rows, (out.index_select(0, rows).float() + delta).to(out.dtype))
    return out
