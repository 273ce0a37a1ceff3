"""Paged attention, chunked prefill and KV-cache writes on every CPU backend."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmo.ops as ops
from llmo.ops import force_backend

from .conftest import ATTN_ATOL, ATTN_RTOL, LOWP_ATOL, dense_attention, device_backends, make_paged_cache

DECODE = device_backends("paged_attention_decode", "cpu")
PREFILL = device_backends("chunked_prefill_attention", "cpu")
WRITE = device_backends("write_kv_cache", "cpu")


@pytest.mark.parametrize("backend", DECODE)
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_decode_matches_dense_attention(backend: str, block_size: int, heads: int, kv_heads: int, head_dim: int) -> None:
    lens = [1, 0, 37, block_size, 2 * block_size + 1]
    cache = make_paged_cache(lens, kv_heads, head_dim, block_size, torch.float32)
    q = torch.randn(len(lens), heads, head_dim)
    scale = 1 / math.sqrt(head_dim)
    with force_backend(backend):
        out = ops.paged_attention_decode(q, cache.key_cache, cache.value_cache, cache.block_tables, cache.context_lens)
    for b in range(len(lens)):
        want = dense_attention(q[b], cache.keys[b], cache.values[b], scale)
        torch.testing.assert_close(out[b], want, atol=ATTN_ATOL, rtol=ATTN_RTOL)


@pytest.mark.parametrize("backend", DECODE)
@pytest.mark.parametrize(("heads", "kv_heads"), [(32, 32), (32, 8), (20, 4), (16, 1), (33, 33)])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_many_heads(backend: str, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    # Sixteen and more query heads per item take the vector kernels' batched-score path
    # (full groups of 16 plus a remainder); every lane must land on its own head.
    lens = [3, 40]
    cache = make_paged_cache(lens, kv_heads, head_dim, 16, dtype)
    q = torch.randn(len(lens), heads, head_dim).to(dtype)
    scale = 1 / math.sqrt(head_dim)
    with force_backend(backend):
        out = ops.paged_attention_decode(q, cache.key_cache, cache.value_cache, cache.block_tables, cache.context_lens)
    for b in range(len(lens)):
        want = dense_attention(q[b].float(), cache.keys[b].float(), cache.values[b].float(), scale)
        if dtype == torch.float32:
            torch.testing.assert_close(out[b], want, atol=ATTN_ATOL, rtol=ATTN_RTOL)
        else:
            torch.testing.assert_close(out[b].float(), want, atol=LOWP_ATOL[dtype], rtol=1e-2)


@pytest.mark.parametrize("backend", DECODE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_low_precision_cache(backend: str, dtype: torch.dtype) -> None:
    lens = [5, 70, 129]
    cache = make_paged_cache(lens, 2, 64, 16, dtype)
    q = torch.randn(3, 8, 64).to(dtype)
    with force_backend(backend):
        out = ops.paged_attention_decode(q, cache.key_cache, cache.value_cache, cache.block_tables, cache.context_lens, scale=0.1)
    assert out.dtype == dtype
    for b in range(3):
        want = dense_attention(q[b], cache.keys[b], cache.values[b], 0.1)
        torch.testing.assert_close(out[b].float(), want, atol=LOWP_ATOL[dtype], rtol=1e-2)


@pytest.mark.parametrize("backend", DECODE)
def test_decode_long_context(backend: str) -> None:
    lens = [4000]
    cache = make_paged_cache(lens, 1, 64, 32, torch.float32)
    q = torch.randn(1, 4, 64) * 3
    with force_backend(backend):
        out = ops.paged_attention_decode(q, cache.key_cache, cache.value_cache, cache.block_tables, cache.context_lens)
    want = dense_attention(q[0], cache.keys[0], cache.values[0], 1 / 8)
    torch.testing.assert_close(out[0], want, atol=ATTN_ATOL, rtol=ATTN_RTOL)


@settings(max_examples=15, deadline=None)
@given(
    lens=st.lists(st.integers(0, 70), min_size=1, max_size=4),
    group=st.sampled_from([1, 2, 4]),
    kv_heads=st.integers(1, 3),
    block_size=st.sampled_from([8, 16, 32]),
)
def test_decode_backends_agree_on_random_shapes(lens: list[int], group: int, kv_heads: int, block_size: int) -> None:
    cache = make_paged_cache(lens, kv_heads, 64, block_size, torch.float32)
    q = torch.randn(len(lens), group * kv_heads, 64)
    outs = []
    for backend in DECODE:
        with force_backend(backend):
            outs.append(ops.paged_attention_decode(q, cache.key_cache, cache.value_cache, cache.block_tables, cache.context_lens))
    for b in range(len(lens)):
        want = dense_attention(q[b], cache.keys[b], cache.values[b], 1 / 8)
        for out in outs:
            torch.testing.assert_close(out[b], want, atol=ATTN_ATOL, rtol=ATTN_RTOL)


def prefill_oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last q.shape[0] positions over k/v[T] (positions T-n..T-1)."""
    n, total = q.shape[0], k.shape[0]
    return torch.stack([dense_attention(q[i], k[: total - n + i + 1], v[: total - n + i + 1], scale) for i in range(n)])


@pytest.mark.parametrize("backend", PREFILL)
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 1)])
def test_chunked_prefill_matches_causal_oracle(backend: str, block_size: int, heads: int, kv_heads: int) -> None:
    lens = [13, 1, 40, 7]
    new = [5, 1, 40, 3]  # cached prefix + new chunk; the third is a fresh prompt
    cache = make_paged_cache(lens, kv_heads, 80, block_size, torch.float32)
    starts = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(starts[-1]), heads, 80)
    scale = 0.11
    with force_backend(backend):
        out = ops.chunked_prefill_attention(
            q, cache.key_cache, cache.value_cache, cache.block_tables, cache.context_lens, starts, scale
        )
    for b in range(len(lens)):
        s, e = int(starts[b]), int(starts[b + 1])
        want = prefill_oracle(q[s:e], cache.keys[b], cache.values[b], scale)
        torch.testing.assert_close(out[s:e], want, atol=ATTN_ATOL, rtol=ATTN_RTOL)


@pytest.mark.parametrize("backend", WRITE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_kv_cache_places_tokens_and_skips_padding(backend: str, dtype: torch.dtype) -> None:
    kc = torch.zeros(4, 8, 2, 64, dtype=dtype)
    vc = torch.zeros_like(kc)
    key = torch.randn(5, 2, 64).to(dtype)
    value = torch.randn(5, 2, 64).to(dtype)
    slots = torch.tensor([0, 9, -1, 31, 17], dtype=torch.int64)
    with force_backend(backend):
        ops.write_kv_cache(key, value, kc, vc, slots)
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        assert torch.equal(kc[slot // 8, slot % 8], key[t])
        assert torch.equal(vc[slot // 8, slot % 8], value[t])
    assert int((kc != 0).any(dim=(2, 3)).sum()) == 4


@pytest.mark.parametrize("backend", PREFILL)
def test_write_then_prefill_then_decode_round_trip(backend: str) -> None:
    """The engine's sequence: write a prompt, prefill over it, decode one more token."""
    block_size, kv_heads, heads, dim = 16, 2, 4, 64
    kc = torch.full((8, block_size, kv_heads, dim), float("nan"))
    vc = torch.full_like(kc, float("nan"))
    table = torch.tensor([[5, 2, 7]], dtype=torch.int32)
    k = torch.randn(20, kv_heads, dim)
    v = torch.randn(20, kv_heads, dim)
    slots = torch.tensor([int(table[0, p // block_size]) * block_size + p % block_size for p in range(20)])
    q = torch.randn(20, heads, dim)
    with force_backend(backend):
        ops.write_kv_cache(k[:19], v[:19], kc, vc, slots[:19])
        pre = ops.chunked_prefill_attention(
            q[:19], kc, vc, table, torch.tensor([19], dtype=torch.int32), torch.tensor([0, 19], dtype=torch.int32)
        )
        ops.write_kv_cache(k[19:], v[19:], kc, vc, slots[19:])
        dec = ops.paged_attention_decode(q[19:], kc, vc, table, torch.tensor([20], dtype=torch.int32))
    torch.testing.assert_close(pre, prefill_oracle(q[:19], k[:19], v[:19], 1 / 8), atol=ATTN_ATOL, rtol=ATTN_RTOL)
    torch.testing.assert_close(dec[0], dense_attention(q[19], k, v, 1 / 8), atol=ATTN_ATOL, rtol=ATTN_RTOL)


def test_bad_attention_inputs_raise_clear_errors() -> None:
    cache = make_paged_cache([4], 2, 64, 16, torch.float32)
    q = torch.randn(1, 4, 64)
    args = (cache.key_cache, cache.value_cache, cache.block_tables, cache.context_lens)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ops.paged_attention_decode(torch.randn(1, 3, 64), *args)
    with pytest.raises(ValueError, match="head_dim"):
        ops.paged_attention_decode(torch.randn(1, 4, 32), *args)
    with pytest.raises(TypeError, match="dtype"):
        ops.paged_attention_decode(q.to(torch.int32), *args)
    with pytest.raises(ValueError, match="block_size"):
        kc = torch.zeros(2, 12, 2, 64)
        ops.paged_attention_decode(q, kc, kc.clone(), cache.block_tables, cache.context_lens)
    with pytest.raises(ValueError, match="capacity"):
        ops.paged_attention_decode(q, *args[:3], torch.tensor([1000], dtype=torch.int32))
    with pytest.raises(ValueError, match="block_tables entries"):
        ops.paged_attention_decode(q, *args[:2], torch.full_like(cache.block_tables, 99), cache.context_lens)
    with pytest.raises(ValueError, match="rows for a batch"):
        ops.paged_attention_decode(torch.randn(2, 4, 64), *args)
    with pytest.raises(TypeError, match="must be a torch"):
        ops.paged_attention_decode([1, 2], *args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slot_mapping entries"):
        ops.write_kv_cache(torch.randn(1, 2, 64), torch.randn(1, 2, 64), cache.key_cache, cache.value_cache, torch.tensor([10_000]))
    with pytest.raises(TypeError, match="cache dtype"):
        ops.write_kv_cache(torch.randn(1, 2, 64).half(), torch.randn(1, 2, 64).half(), cache.key_cache, cache.value_cache, torch.tensor([0]))
    with pytest.raises(ValueError, match="more new tokens"):
        ops.chunked_prefill_attention(torch.randn(9, 4, 64), *args, torch.tensor([0, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="query_start_loc must rise"):
        ops.chunked_prefill_attention(torch.randn(3, 4, 64), *args, torch.tensor([0, 2], dtype=torch.int32))


def test_selected_backend_is_observable() -> None:
    q = torch.randn(1, 4, 64)
    assert ops.selected_backend("paged_attention_decode", q) in DECODE
    with force_backend("reference"):
        assert ops.selected_backend("paged_attention_decode", q) == "reference"
    with pytest.raises(ValueError, match="unknown op"):
        ops.selected_backend("no_such_op", q)
