"""The kernel tests again on a GPU: ``cuda`` (llmo_native._cuda) and ``triton``
backends on CUDA tensors against the reference computed on the CPU.
Run with ``pytest -m gpu tests/gpu``; skipped where no NVIDIA GPU is visible."""

from __future__ import annotations

import math

import pytest
import torch

import llmo.ops as ops
from llmo.ops import force_backend, get_op

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)"),
]


def gpu_backends(op: str) -> list[str]:
    overrides = get_op(op).overrides
    found = [b for b in ("cuda", "triton") if b in overrides and overrides[b].available()]
    if not found:
        pytest.skip(f"no GPU backend of {op} can load here")
    return found


def paged_cache(lens: list[int], kv_heads: int, dim: int, block_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    blocks = [max(1, -(-n // block_size)) for n in lens]
    num_blocks = sum(blocks) + 2
    kc = torch.full((num_blocks, block_size, kv_heads, dim), float("nan"), dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    perm = torch.randperm(num_blocks)
    table = torch.full((len(lens), max(blocks) + 1), int(perm[-1]), dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        ids = perm[used : used + blocks[b]]
        used += blocks[b]
        table[b, : len(ids)] = ids.to(torch.int32)
        for t in range(n):
            kc[ids[t // block_size], t % block_size] = torch.randn(kv_heads, dim).to(dtype)
            vc[ids[t // block_size], t % block_size] = torch.randn(kv_heads, dim).to(dtype)
    return kc, vc, table, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_paged_decode_on_gpu(block_size: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> None:
    lens = [1, 0, 37, 700, 2100]  # 700 and 2100 take the split-K path (partitions of 512)
    kc, vc, table, cl = paged_cache(lens, kv_heads, dim, block_size, dtype)
    q = torch.randn(len(lens), heads, dim).to(dtype)
    with force_backend("reference"):
        want = ops.paged_attention_decode(q, kc, vc, table, cl).float()
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    for backend in gpu_backends("paged_attention_decode"):
        with force_backend(backend):
            got = ops.paged_attention_decode(q.cuda(), kc.cuda(), vc.cuda(), table.cuda(), cl.cuda())
        torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=1e-2 if dtype != torch.float32 else 1e-5)


def test_chunked_prefill_on_gpu() -> None:
    lens = [13, 600, 7]  # new tokens per sequence: 5, 600 (a fresh prompt), 3
    kc, vc, table, cl = paged_cache(lens, 2, 64, 16, torch.float32)
    starts = torch.tensor([0, 5, 605, 608], dtype=torch.int32)
    q = torch.randn(608, 4, 64)
    with force_backend("reference"):
        want = ops.chunked_prefill_attention(q, kc, vc, table, cl, starts)
    for backend in gpu_backends("chunked_prefill_attention"):
        with force_backend(backend):
            got = ops.chunked_prefill_attention(q.cuda(), kc.cuda(), vc.cuda(), table.cuda(), cl.cuda(), starts.cuda())
        torch.testing.assert_close(got.cpu(), want, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_kv_cache_on_gpu(dtype: torch.dtype) -> None:
    kc = torch.zeros(4, 8, 2, 64, dtype=dtype, device="cuda")
    vc = torch.zeros_like(kc)
    key = torch.randn(3, 2, 64, device="cuda").to(dtype)
    slots = torch.tensor([3, -1, 30], device="cuda")
    for backend in gpu_backends("write_kv_cache"):
        with force_backend(backend):
            ops.write_kv_cache(key, key, kc, vc, slots)
        assert torch.equal(kc[0, 3], key[0]) and torch.equal(vc[3, 6], key[2])


@pytest.mark.parametrize("m", [1, 7, 13, 33, 300])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_int8_gemm_on_gpu(m: int, out_dtype: torch.dtype) -> None:
    a = torch.randint(-127, 128, (m, 200), dtype=torch.int8)
    b = torch.randint(-128, 128, (70, 200), dtype=torch.int8)
    a_s, b_s, bias = torch.rand(m) * 0.01, torch.rand(70) * 0.01, torch.randn(70)
    with force_backend("reference"):
        want = ops.int8_gemm(a, b, a_s, b_s, bias)
        q_ref, s_ref = ops.quantize_per_token(torch.randn(m, 200).mul(3))
    for backend in gpu_backends("int8_gemm"):
        with force_backend(backend):
            got = ops.int8_gemm(a.cuda(), b.cuda(), a_s.cuda(), b_s.cuda(), bias.cuda(), out_dtype)
        assert got.dtype == out_dtype
        torch.testing.assert_close(got.float().cpu(), want, atol=1e-2 if out_dtype != torch.float32 else 1e-4, rtol=1e-2)
    x = torch.randn(m, 200) * 3
    with force_backend("reference"):
        q_ref, s_ref = ops.quantize_per_token(x)
    for backend in gpu_backends("quantize_per_token"):
        with force_backend(backend):
            q, s = ops.quantize_per_token(x.cuda())
        torch.testing.assert_close(s.cpu(), s_ref)
        assert int((q.cpu().int() - q_ref.int()).abs().max()) <= 1


@pytest.mark.parametrize("m", [1, 7, 33])
def test_int8_linear_on_gpu(m: int) -> None:
    x = torch.randn(m, 203) + 0.4
    w = torch.randint(-127, 128, (70, 203), dtype=torch.int8)
    w_s, bias = torch.rand(70) * 0.01, torch.randn(70)
    with force_backend("reference"):
        want = ops.int8_linear(x, w, w_s, bias)
    for backend in gpu_backends("int8_linear"):
        with force_backend(backend):
            got = ops.int8_linear(x.cuda(), w.cuda(), w_s.cuda(), bias.cuda())
        # same u7 codes (fp32 rounding on the GPU may move a code by one) and exact int32 dots
        torch.testing.assert_close(got.cpu(), want, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("m", [1, 7, 13, 33, 64])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4_gemm_on_gpu(m: int, group: int, dtype: torch.dtype) -> None:
    packed, scales, zeros = ops.quantize_int4(torch.randn(72, 384), group)
    x = torch.randn(m, 384).to(dtype)
    want = x.float() @ ops.dequantize_int4(packed, scales, zeros, group).t()
    for backend in gpu_backends("int4_gemm"):
        with force_backend(backend):
            got = ops.int4_gemm(x.cuda(), packed.cuda(), scales.cuda(), zeros.cuda(), group)
        assert got.dtype == dtype
        rel = float((got.float().cpu() - want).abs().mean() / want.abs().mean())
        assert rel < 0.04


def test_rmsnorm_rotary_silu_on_gpu() -> None:
    x = torch.randn(7, 96)
    w = torch.rand(96)
    pos = torch.tensor([0, 3, 9, 1, 2, 5, 7])
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    freqs = torch.outer(torch.arange(16).float(), inv)
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=1)
    q, k = torch.randn(7, 4, 64), torch.randn(7, 2, 64)
    with force_backend("reference"):
        want = (ops.rms_norm(x, w), ops.rotary_embedding(pos, q, k, cache), ops.silu_and_mul(x))
    for backend in gpu_backends("rms_norm"):
        with force_backend(backend):
            got_norm = ops.rms_norm(x.cuda(), w.cuda())
            got_q, got_k = ops.rotary_embedding(pos.cuda(), q.cuda(), k.cuda(), cache.cuda())
            got_silu = ops.silu_and_mul(x.cuda())
        torch.testing.assert_close(got_norm.cpu(), want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_q.cpu(), want[1][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_k.cpu(), want[1][1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_silu.cpu(), want[2], atol=1e-5, rtol=1e-5)
    assert math.isfinite(float(want[0].sum()))
