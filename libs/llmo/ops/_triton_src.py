"""Triton kernel sources (imported lazily by :mod:`llmo.ops.triton_kernels`).

They live at module level because Triton's interpreter patches ``tl`` through the
kernels' module globals; ``TRITON_INTERPRET`` is read when this module is imported.
"""

# mypy: disable-error-code="no-untyped-def"

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / n_cols
    y = x * (1.0 / tl.sqrt(var + eps)) * w
    tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

@triton.jit
def silu_mul_kernel(x_ptr, out_ptr, d, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    start = tl.program_id(1) * BLOCK
    cols = start + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * 2 * d + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * d + d + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * d + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

@triton.jit
def rotary_kernel(
    pos_ptr, x_ptr, cache_ptr, heads, head_dim, rot_dim, HALF: tl.constexpr
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    half = rot_dim // 2
    i = tl.arange(0, HALF)
    mask = i < half
    pos = tl.load(pos_ptr + token)
    cos = tl.load(cache_ptr + pos * rot_dim + i, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * rot_dim + half + i, mask=mask, other=0.0).to(tl.float32)
    base = x_ptr + (token * heads + head) * head_dim
    x1 = tl.load(base + i, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + half + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(base + i, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + half + i, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)

@triton.jit
def paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, lens_ptr, scale,
    heads, kv_heads, head_dim, max_blocks,
    BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kvh = head // (heads // kv_heads)
    length = tl.load(lens_ptr + seq)
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    q = tl.load(q_ptr + (seq * heads + head) * head_dim + d, mask=dmask, other=0.0).to(tl.float32) * scale
    t = tl.arange(0, BLOCK_SIZE)
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    num_blocks = tl.cdiv(length, BLOCK_SIZE)
    for b in range(0, num_blocks):
        block = tl.load(table_ptr + seq * max_blocks + b).to(tl.int64)
        tok = b * BLOCK_SIZE + t
        tmask = tok < length
        offs = ((block * BLOCK_SIZE + t)[:, None] * kv_heads + kvh) * head_dim + d[None, :]
        mask2 = tmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + offs, mask=mask2, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(tmask, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        p = tl.where(tmask, p, 0.0)
        v = tl.load(v_ptr + offs, mask=mask2, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)  # empty context: acc is 0
    tl.store(out_ptr + (seq * heads + head) * head_dim + d, out.to(out_ptr.dtype.element_ty), mask=dmask)
