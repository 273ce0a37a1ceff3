"""Argument validation shared by every backend: bad input raises ValueError/TypeError
here, before any native code can see it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
BLOCK_SIZES = (8, 16, 32)


def tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def dims(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def dtype_in(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of: {names}")


def same_device(**tensors: torch.Tensor | None) -> None:
    # Hot path (every op call): all-CPU needs no device objects.
    if all(v is None or v.is_cpu for v in tensors.values()):
        return
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k}={v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")


def shape_eq(name: str, got: Sequence[int], want: Sequence[int]) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"{name} must have shape {tuple(want)}, got {tuple(got)}")


def kv_cache(key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[int, int, int, int]:
    tensor("key_cache", key_cache)
    tensor("value_cache", value_cache)
    dims("key_cache", key_cache, 4)
    shape_eq("value_cache", value_cache.shape, key_cache.shape)
    dtype_in("key_cache", key_cache, FLOAT_DTYPES)
    if value_cache.dtype != key_cache.dtype:
        raise TypeError(f"value_cache dtype {value_cache.dtype} differs from key_cache dtype {key_cache.dtype}")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("key_cache and value_cache must be contiguous")
    num_blocks, block_size, kv_heads, head_dim = key_cache.shape
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    return num_blocks, block_size, kv_heads, head_dim


def attention_query(query: torch.Tensor, kv_heads: int, head_dim: int) -> int:
    tensor("query", query)
    dims("query", query, 3)
    dtype_in("query", query, FLOAT_DTYPES)
    heads = query.shape[1]
    if query.shape[2] != head_dim:
        raise ValueError(f"query head_dim {query.shape[2]} != cache head_dim {head_dim}")
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    return heads


def block_table(block_tables: torch.Tensor, batch: int) -> None:
    tensor("block_tables", block_tables)
    dims("block_tables", block_tables, 2)
    dtype_in("block_tables", block_tables, INDEX_DTYPES)
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for a batch of {batch}")


def lengths(name: str, lens: torch.Tensor, batch: int) -> None:
    tensor(name, lens)
    dims(name, lens, 1)
    dtype_in(name, lens, INDEX_DTYPES)
    if lens.shape[0] != batch:
        raise ValueError(f"{name} has {lens.shape[0]} entries for a batch of {batch}")


def host_checked(t: torch.Tensor) -> bool:
    """Value checks (index ranges) run for CPU tensors only: on a GPU they would
    force a host synchronisation on every call, so CUDA callers own them."""
    return t.device.type == "cpu"


def used_blocks(
    block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, num_blocks: int
) -> None:
    """Every block a sequence's context touches must exist; unused table entries are ignored."""
    max_blocks = block_tables.shape[1]
    if not host_checked(block_tables) or context_lens.numel() == 0:
        return
    if int(context_lens.min()) < 0:
        raise ValueError("context_lens must be non-negative")
    capacity = max_blocks * block_size
    if int(context_lens.max()) > capacity:
        raise ValueError(f"context_lens exceed the block table capacity ({max_blocks} blocks x {block_size})")
    needed = (context_lens.long() + block_size - 1) // block_size
    mask = torch.arange(max_blocks, device=block_tables.device).unsqueeze(0) < needed.unsqueeze(1)
    used = block_tables[mask]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
        raise ValueError(f"block_tables entries in use must lie in [0, {num_blocks})")
