"""INT8 W8A8 and INT4 weight-only GEMMs and per-token quantization vs the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmo.ops as ops
from llmo.ops import force_backend

from .conftest import INT4_MEAN_REL, device_backends

INT8 = device_backends("int8_gemm", "cpu")
INT4 = device_backends("int4_gemm", "cpu")
QUANT = device_backends("quantize_per_token", "cpu")


def mean_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().mean() / want.float().abs().mean())


@pytest.mark.parametrize("backend", QUANT)
@pytest.mark.parametrize(("m", "k"), [(1, 64), (7, 100), (13, 4096), (33, 17)])
def test_quantize_per_token_matches_reference(backend: str, m: int, k: int) -> None:
    x = torch.randn(m, k) * torch.rand(m, 1) * 10
    x[0, 0] = 0.0
    with force_backend(backend):
        q, s = ops.quantize_per_token(x)
    with force_backend("reference"):
        q_ref, s_ref = ops.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    torch.testing.assert_close(s, s_ref)
    assert int((q.int() - q_ref.int()).abs().max()) <= 1
    assert int(q.min()) >= -127
    torch.testing.assert_close(q.float() * s.unsqueeze(1), x, atol=float(s.max()) * 0.51, rtol=0)


def test_quantize_zero_row_is_exact() -> None:
    q, s = ops.quantize_per_token(torch.zeros(2, 64))
    assert torch.equal(q, torch.zeros(2, 64, dtype=torch.int8))
    assert torch.equal(s, torch.ones(2))


@pytest.mark.parametrize("backend", INT8)
@pytest.mark.parametrize("m", [1, 7, 13, 33])
@pytest.mark.parametrize(("n", "k"), [(64, 64), (37, 100), (129, 4096)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_gemm_is_exact_up_to_scaling(backend: str, m: int, n: int, k: int, with_bias: bool) -> None:
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    a_s = torch.rand(m) * 0.01 + 1e-3
    b_s = torch.rand(n) * 0.01 + 1e-3
    bias = torch.randn(n) if with_bias else None
    with force_backend(backend):
        out = ops.int8_gemm(a, b, a_s, b_s, bias)
    exact = (a.double() @ b.double().t()) * a_s.double()[:, None] * b_s.double()[None, :]
    if bias is not None:
        exact = exact + bias.double()
    torch.testing.assert_close(out.double(), exact, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", INT8)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_int8_linear_low_precision_output(backend: str, out_dtype: torch.dtype) -> None:
    x = torch.randn(5, 256).to(out_dtype)
    w = torch.randn(48, 256)
    w_s = w.abs().amax(dim=1) / 127
    w_q = torch.round(w / w_s[:, None]).to(torch.int8)
    with force_backend(backend):
        out = ops.int8_linear(x, w_q, w_s)
    assert out.dtype == out_dtype and out.shape == (5, 48)
    assert mean_rel_err(out, x.float() @ w.t()) < 0.02


@pytest.mark.parametrize("backend", INT4)
@pytest.mark.parametrize("m", [1, 7, 13, 33, 64])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4_gemm_matches_dequantized_reference(backend: str, m: int, group_size: int, dtype: torch.dtype) -> None:
    n, k = 72, 384
    w = torch.randn(n, k)
    packed, scales, zeros = ops.quantize_int4(w, group_size)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n)
    with force_backend(backend):
        out = ops.int4_gemm(x, packed, scales, zeros, group_size, bias)
    want = x.float() @ ops.dequantize_int4(packed, scales, zeros, group_size).t() + bias
    assert out.dtype == dtype and out.shape == (m, n)
    assert mean_rel_err(out, want) < INT4_MEAN_REL
    # Activations are quantized to int8 per group inside the kernel: far below the budget.
    assert mean_rel_err(out, want) < 0.01


@pytest.mark.parametrize("backend", INT4)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4_gemm_accepts_scale_dtypes(backend: str, scale_dtype: torch.dtype) -> None:
    w = torch.randn(16, 128)
    packed, scales, zeros = ops.quantize_int4(w, 64)
    scales = scales.to(scale_dtype)
    x = torch.randn(3, 128)
    with force_backend(backend):
        out = ops.int4_gemm(x, packed, scales, zeros, 64)
    want = x @ ops.dequantize_int4(packed, scales, zeros, 64).t()
    assert mean_rel_err(out, want) < 0.01


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 40),
    chunks=st.integers(1, 6),
    group_size=st.sampled_from([32, 64, 128]),
)
def test_int4_backends_agree_on_random_shapes(m: int, n: int, chunks: int, group_size: int) -> None:
    k = 128 * chunks
    packed, scales, zeros = ops.quantize_int4(torch.randn(n, k), group_size)
    x = torch.randn(m, k)
    w = ops.dequantize_int4(packed, scales, zeros, group_size)
    want = x @ w.t()
    # Per-element bound against the magnitude of the summed products, so a
    # tiny output produced by cancellation does not count as a large error.
    bound = 0.01 * (x.abs() @ w.abs().t()) + 1e-5
    for backend in INT4:
        with force_backend(backend):
            out = ops.int4_gemm(x, packed, scales, zeros, group_size)
        assert bool(((out - want).abs() <= bound).all())


def test_int4_pack_round_trip_and_layout() -> None:
    q = torch.randint(0, 16, (3, 128), dtype=torch.uint8)
    packed = ops.pack_int4(q)
    assert packed.shape == (3, 64)
    assert torch.equal(ops.unpack_int4(packed), q)
    # byte j of a 64-channel chunk = q[j] | q[j + 32] << 4
    assert int(packed[1, 5]) == int(q[1, 5]) | (int(q[1, 37]) << 4)
    assert int(packed[2, 32 + 3]) == int(q[2, 64 + 3]) | (int(q[2, 96 + 3]) << 4)


def test_bad_gemm_inputs_raise_clear_errors() -> None:
    a = torch.randint(-127, 128, (2, 64), dtype=torch.int8)
    b = torch.randint(-127, 128, (3, 64), dtype=torch.int8)
    with pytest.raises(ValueError, match="inner dimensions"):
        ops.int8_gemm(a, b[:, :32], torch.ones(2), torch.ones(3))
    with pytest.raises(TypeError, match="dtype"):
        ops.int8_gemm(a.float(), b, torch.ones(2), torch.ones(3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="b_scales"):
        ops.int8_gemm(a, b, torch.ones(2), torch.ones(4))
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        ops.int8_gemm(torch.full((1, 64), -128, dtype=torch.int8), b, torch.ones(1), torch.ones(3))
    with pytest.raises(TypeError, match="out_dtype"):
        ops.int8_gemm(a, b, torch.ones(2), torch.ones(3), out_dtype=torch.int32)
    packed, scales, zeros = ops.quantize_int4(torch.randn(8, 128), 64)
    with pytest.raises(ValueError, match="group_size"):
        ops.int4_gemm(torch.randn(1, 128), packed, scales, zeros, 48)
    with pytest.raises(ValueError, match="multiple of 64"):
        ops.int4_gemm(torch.randn(1, 96), packed[:, :48], scales, zeros, 32)
    with pytest.raises(ValueError, match="scales must have shape"):
        ops.int4_gemm(torch.randn(1, 128), packed, scales[:, :1], zeros, 64)
    with pytest.raises(TypeError, match="packed_w"):
        ops.int4_gemm(torch.randn(1, 128), packed.to(torch.int8), scales, zeros, 64)
    with pytest.raises(ValueError, match="2-D"):
        ops.quantize_per_token(torch.randn(4))
    with pytest.raises(ValueError, match="K divisible by 64"):
        ops.pack_int4(torch.zeros(2, 40, dtype=torch.uint8))
