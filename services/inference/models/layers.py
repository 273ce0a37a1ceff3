"""Reference PyTorch implementations of the model's fused ops and paged attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    kvh, d = k_cache.shape[-2:]
    k_cache.view(-1, kvh, d)[slot_mapping] = k
    v_cache.view(-1, kvh, d)[slot_mapping] = v


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    block_size = cache.shape[1]
    nblocks = (length + block_size - 1) // block_size
    return cache[block_table[:nblocks]].flatten(0, 1)[:length]


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                      context_len: int, scale: float, sliding_window: int | None) -> torch.Tensor:
    """Causal attention of the last q.shape[0] tokens of a sequence over its cached context.

    q: [T, H, D]; returns [T, H, D].
    """
    t = q.shape[0]
    k = _gather(k_cache, block_table, context_len)
    v = _gather(v_cache, block_table, context_len)
    qpos = torch.arange(context_len - t, context_len, device=q.device)
    kpos = torch.arange(context_len, device=q.device)
    mask = kpos[None, :] <= qpos[:, None]
    if sliding_window is not None:
        mask &= kpos[None, :] > qpos[:, None] - sliding_window
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.transpose(0, 1)


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None) -> torch.Tensor:
    """One query token per sequence against its paged context. q: [S, H, D]; returns [S, H, D]."""
    s, h, d = q.shape
    kvh = k_cache.shape[2]
    block_size = k_cache.shape[1]
    max_len = int(context_lens.max())
    nblocks = (max_len + block_size - 1) // block_size
    tables = block_tables[:, :nblocks]
    k = k_cache[tables].reshape(s, nblocks * block_size, kvh, d)
    v = v_cache[tables].reshape(s, nblocks * block_size, kvh, d)
    group = h // kvh
    qg = q.view(s, kvh, group, d).float()
    scores = torch.einsum("skgd,sLkd->skgL", qg, k.float()) * scale
    pos = torch.arange(nblocks * block_size, device=q.device)
    valid = pos[None, :] < context_lens[:, None]
    if sliding_window is not None:
        valid &= pos[None, :] >= (context_lens[:, None] - sliding_window)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    out = torch.einsum("skgL,sLkd->skgd", probs, v.float())
    return out.reshape(s, h, d).to(q.dtype)
