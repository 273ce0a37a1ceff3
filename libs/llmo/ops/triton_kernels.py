"""``triton`` backend: fused RMSNorm, NeoX rotary, SiLU-and-mul and a paged decode
attention written in Triton.

Chosen automatically on CUDA tensors when Triton is installed (after the
``cuda`` backend for the ops that have one). On a CPU the kernels run under
Triton's interpreter (``TRITON_INTERPRET=1``), which is how the test suite
checks them on machines without a GPU. Kernels are compiled lazily on first use.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import torch

from llmo.ops.registry import register


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def available() -> bool:
    return _installed() and (torch.cuda.is_available() or _interpret())


def _runs_here(*args: object, **kwargs: object) -> bool:
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    return all(t.device.type == "cuda" for t in tensors) or _interpret()


def _k() -> Any:
    """The kernel module; importing it compiles nothing until the first launch."""
    from llmo.ops import _triton_src

    return _triton_src


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    k = _k()
    cols = x.shape[-1]
    x2 = x.reshape(-1, cols)
    out = torch.empty_like(x2)
    if x2.shape[0]:
        k.rms_norm_kernel[(x2.shape[0],)](x2, weight, out, cols, eps, BLOCK=_pow2(cols))
    return out.reshape(x.shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    k = _k()
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    block = min(1024, _pow2(d))
    if x2.shape[0] and d:
        k.silu_mul_kernel[(x2.shape[0], -(-d // block))](x2, out, d, BLOCK=block)
    return out.reshape(*x.shape[:-1], d)


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    k = _k()
    rot_dim = cos_sin_cache.shape[1]
    half = _pow2(rot_dim // 2)
    pos = positions.to(torch.int64).contiguous()
    outs = []
    for t in (query, key):
        out = t.clone()
        if out.shape[0]:
            k.rotary_kernel[(out.shape[0], out.shape[1])](pos, out, cos_sin_cache, out.shape[1], out.shape[2], rot_dim, HALF=half)
        outs.append(out)
    return outs[0], outs[1]


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    k = _k()
    batch, heads, dim = query.shape
    _, block_size, kv_heads, _ = key_cache.shape
    out = torch.empty_like(query)
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    if batch:
        k.paged_decode_kernel[(batch, heads)](
            query, key_cache, value_cache, out, tables, lens, scale, heads, kv_heads, dim, tables.shape[1],
            BLOCK_SIZE=block_size, BLOCK_D=_pow2(dim),
        )
    return out


def register_triton() -> None:
    register("rms_norm", "triton", rms_norm, available, _runs_here)
    register("silu_and_mul", "triton", silu_and_mul, available, _runs_here)
    register("rotary_embedding", "triton", rotary_embedding, available, _runs_here)
    register("paged_attention_decode", "triton", paged_attention_decode, available, _runs_here)
