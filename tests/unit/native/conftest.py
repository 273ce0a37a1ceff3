"""Shared helpers for kernel tests: backend lists, tolerances, paged cache builders."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from llmo.ops import get_op

# vLLM's kernel-test tolerances for attention; tighter ones where the math is exact.
ATTN_ATOL = 1e-3
ATTN_RTOL = 1e-5
LOWP_ATOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 2e-3}
INT4_MEAN_REL = 0.04


def device_backends(op: str, device: str) -> list[str]:
    """Backends that can run ``op`` on ``device`` here (reference first)."""
    found = ["reference"]
    overrides = get_op(op).overrides
    if device == "cpu":
        if "cpu" in overrides and overrides["cpu"].available():
            found.append("cpu")
        if "triton" in overrides and overrides["triton"].available() and os.environ.get("TRITON_INTERPRET") == "1":
            found.append("triton")
    elif device == "cuda":
        for name in ("cuda", "triton"):
            if name in overrides and overrides[name].available():
                found.append(name)
    return found


def run_on(op: str, backend: str):  # type: ignore[no-untyped-def]
    return get_op(op).impl(backend)


@dataclass
class PagedCache:
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def make_paged_cache(
    lens: list[int], kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
    device: str = "cpu", seed: int = 0,
) -> PagedCache:
    """Random per-sequence K/V scattered over shuffled blocks; every slot not holding
    a real token is NaN, so a kernel reading past a context or into a foreign block
    turns its output into NaN."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [max(1, (n + block_size - 1) // block_size) for n in lens]
    max_blocks = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + 3
    kc = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    keys, values, used = [], [], 0
    for b, n in enumerate(lens):
        k = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
        ids = perm[used : used + blocks_per_seq[b]]
        used += blocks_per_seq[b]
        tables[b, : len(ids)] = ids.to(torch.int32)
        # Entries past the context point at a NaN-filled block no sequence owns.
        tables[b, len(ids) :] = int(perm[-1])
        for t in range(n):
            kc[ids[t // block_size], t % block_size] = k[t]
            vc[ids[t // block_size], t % block_size] = v[t]
        keys.append(k)
        values.append(v)
    return PagedCache(
        kc.to(device), vc.to(device), tables.to(device),
        torch.tensor(lens, dtype=torch.int32, device=device), keys, values,
    )


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Independent oracle: q[H,D] over k/v[T,Hkv,D] (fp32 math)."""
    heads, kv_heads = q.shape[0], k.shape[1]
    if k.shape[0] == 0:
        return torch.zeros_like(q, dtype=torch.float32)
    k = k.float().repeat_interleave(heads // kv_heads, dim=1)
    v = v.float().repeat_interleave(heads // kv_heads, dim=1)
    s = torch.einsum("hd,thd->ht", q.float(), k) * scale
    return torch.einsum("ht,thd->hd", torch.softmax(s, -1), v)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
