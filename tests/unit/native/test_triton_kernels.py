"""Triton kernels (RMSNorm, rotary, SiLU-and-mul, paged decode) on the CPU through
Triton's interpreter (TRITON_INTERPRET=1), against the PyTorch reference."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator

import pytest
import torch

import llmo.ops as ops
from llmo.ops import force_backend

from .conftest import ATTN_ATOL, ATTN_RTOL, dense_attention, make_paged_cache

# Triton decides interpreter vs compiler when it is first imported, so the flag
# must be set before that import, for the rest of this test process.
_compiled_mode_loaded = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed (requirements/native.txt)")
if _compiled_mode_loaded:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)


@pytest.fixture(autouse=True)
def _interpreter() -> Iterator[None]:
    with force_backend("triton"):
        yield


def reference(fn, *args):  # type: ignore[no-untyped-def]
    with force_backend("reference"):
        return fn(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (7, 96), (3, 5, 33)])
def test_rms_norm(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape).to(dtype)
    w = torch.rand(shape[-1]).to(dtype)
    got = ops.rms_norm(x, w, 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, reference(ops.rms_norm, x, w, 1e-5), atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", [(1, 128), (13, 2 * 1500), (2, 3, 22)])
def test_silu_and_mul(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape)
    torch.testing.assert_close(ops.silu_and_mul(x), reference(ops.silu_and_mul, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dim", "rot_dim"), [(64, 64), (80, 80), (128, 64)])
def test_rotary_embedding(dim: int, rot_dim: int) -> None:
    inv = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    freqs = torch.outer(torch.arange(64).float(), inv)
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=1)
    pos = torch.tensor([0, 5, 63, 1, 17, 2, 9])
    q, k = torch.randn(7, 4, dim), torch.randn(7, 2, dim)
    got_q, got_k = ops.rotary_embedding(pos, q, k, cache)
    want_q, want_k = reference(ops.rotary_embedding, pos, q, k, cache)
    torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, want_k, atol=1e-5, rtol=1e-5)
    # Channels past rot_dim pass through untouched, and the inputs are not modified.
    assert torch.equal(got_q[..., rot_dim:], q[..., rot_dim:])
    assert not torch.equal(got_q, q)


@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 1)])
@pytest.mark.parametrize("dim", [64, 80])
def test_paged_decode(block_size: int, heads: int, kv_heads: int, dim: int) -> None:
    lens = [1, 0, 19, 2 * block_size]
    cache = make_paged_cache(lens, kv_heads, dim, block_size, torch.float32)
    q = torch.randn(len(lens), heads, dim)
    out = ops.paged_attention_decode(q, cache.key_cache, cache.value_cache, cache.block_tables, cache.context_lens)
    for b in range(len(lens)):
        want = dense_attention(q[b], cache.keys[b], cache.values[b], 1 / math.sqrt(dim))
        torch.testing.assert_close(out[b], want, atol=ATTN_ATOL, rtol=ATTN_RTOL)


def test_triton_backend_is_never_auto_selected_on_cpu() -> None:
    with force_backend("cpu", op="rms_norm"):
        pass
    x = torch.randn(2, 8)
    from llmo.ops.registry import _forced

    saved = dict(_forced)
    _forced.clear()
    try:
        assert ops.selected_backend("rms_norm", x) == "reference"
    finally:
        _forced.update(saved)
