"""INT8 W8A8 and INT4 weight-only GEMMs and per-token quantization vs the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import llmo.ops as ops
from llmo.ops import force_backend, reference

from .conftest import INT4_MEAN_REL, device_backends

INT8 = device_backends("int8_gemm", "cpu")
LINEAR = device_backends("int8_linear", "cpu")
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


def int8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Gaussian weight, its symmetric per-row int8 codes and scales."""
    w = torch.randn(n, k)
    w_s = w.abs().amax(dim=1) / 127
    return w, torch.round(w / w_s[:, None]).to(torch.int8), w_s


def u7_linear_exact(
    x: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """int8_linear's definition computed independently in fp64 from the u7 codes."""
    q, s, zp = reference.quantize_per_token_u7(x)
    acc = (q.double() - zp.double()[:, None]) @ w_q.double().t()
    out = acc * s.double()[:, None] * w_s.double()[None, :]
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize(("m", "k"), [(1, 64), (7, 100), (13, 4096), (33, 17), (2, 1)])
def test_u7_quantization_codes(m: int, k: int) -> None:
    x = torch.randn(m, k) * torch.rand(m, 1) * 10 + torch.randn(m, 1)
    x[0] = x[0].abs() + 0.5  # an all-positive row: zero point 0
    q, s, zp = reference.quantize_per_token_u7(x)
    assert q.dtype == torch.uint8 and s.dtype == torch.float32 and zp.dtype == torch.int32
    assert int(q.max()) <= 127 and int(zp.min()) >= 0 and int(zp.max()) <= 127
    assert int(zp[0]) == 0
    # round-to-nearest: every value within half a step of its code (zero exactly representable)
    back = (q.float() - zp.float()[:, None]) * s[:, None]
    assert bool(((back - x).abs() <= s[:, None] * 0.5001).all())


def test_u7_native_codes_are_bit_exact() -> None:
    native = pytest.importorskip("llmo_native")
    for m, k in [(1, 64), (5, 100), (3, 4097), (4, 7)]:
        x = torch.randn(m, k) * 3 + 0.7
        q = torch.empty(m, k, dtype=torch.uint8)
        s = torch.empty(m)
        zp = torch.empty(m, dtype=torch.int32)
        native.quantize_rows_u7(x.data_ptr(), q.data_ptr(), s.data_ptr(), zp.data_ptr(), m, k)
        q_ref, s_ref, zp_ref = reference.quantize_per_token_u7(x)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref) and torch.equal(zp, zp_ref)


def test_u7_zero_rows_are_exact() -> None:
    q, s, zp = reference.quantize_per_token_u7(torch.zeros(2, 64))
    assert torch.equal(q, torch.zeros(2, 64, dtype=torch.uint8))
    assert torch.equal(s, torch.ones(2)) and torch.equal(zp, torch.zeros(2, dtype=torch.int32))


@pytest.mark.parametrize("backend", LINEAR)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 13, 33])
@pytest.mark.parametrize(("n", "k"), [(64, 64), (37, 100), (13, 67), (129, 4096), (8, 3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_linear_matches_its_definition(backend: str, m: int, n: int, k: int, with_bias: bool) -> None:
    w, w_q, w_s = int8_weight(n, k)
    x = torch.randn(m, k) * 2 + 0.3
    bias = torch.randn(n) if with_bias else None
    with force_backend(backend):
        out = ops.int8_linear(x, w_q, w_s, bias)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    # integer dot products are exact; only the final fp32 rounding differs
    torch.testing.assert_close(out.double(), u7_linear_exact(x, w_q, w_s, bias), atol=1e-5, rtol=1e-6)
    want = x @ w.t() + (0 if bias is None else bias)
    assert mean_rel_err(out, want) < 0.03


def test_int8_linear_cpu_is_bit_exact_with_reference() -> None:
    if "cpu" not in LINEAR:
        pytest.skip("llmo_native not built")
    _, w_q, w_s = int8_weight(45, 300)
    w_q[0, :7] = -128  # the kernel handles the full int8 range
    x = torch.randn(9, 300)
    bias = torch.randn(45)
    with force_backend("cpu"):
        got = ops.int8_linear(x, w_q, w_s, bias)
    with force_backend("reference"):
        want = ops.int8_linear(x, w_q, w_s, bias)
    assert torch.equal(got, want)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 70), k=st.integers(1, 300), shift=st.floats(-3, 3))
def test_int8_linear_backends_agree_on_random_shapes(m: int, n: int, k: int, shift: float) -> None:
    _, w_q, w_s = int8_weight(n, k)
    x = torch.randn(m, k) + shift
    want = u7_linear_exact(x, w_q, w_s, None)
    for backend in LINEAR:
        with force_backend(backend):
            out = ops.int8_linear(x, w_q, w_s)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-6)


def test_int8_linear_repacks_after_in_place_update() -> None:
    _, w_q, w_s = int8_weight(24, 64)
    x = torch.randn(3, 64)
    with force_backend("cpu" if "cpu" in LINEAR else "reference"):
        first = ops.int8_linear(x, w_q, w_s)
        w_q.neg_()
        second = ops.int8_linear(x, w_q, w_s)
    torch.testing.assert_close(second.double(), u7_linear_exact(x, w_q, w_s, None), atol=1e-5, rtol=1e-6)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("backend", LINEAR)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_int8_linear_low_precision_output(backend: str, out_dtype: torch.dtype) -> None:
    w, w_q, w_s = int8_weight(48, 256)
    x = torch.randn(5, 256).to(out_dtype)
    with force_backend(backend):
        out = ops.int8_linear(x, w_q, w_s)
    assert out.dtype == out_dtype and out.shape == (5, 48)
    assert mean_rel_err(out, x.float() @ w.t()) < 0.03


@pytest.mark.parametrize("backend", LINEAR)
def test_int8_linear_keeps_leading_dims(backend: str) -> None:
    _, w_q, w_s = int8_weight(12, 40)
    x = torch.randn(2, 3, 40)
    with force_backend(backend):
        out = ops.int8_linear(x, w_q, w_s)
    assert out.shape == (2, 3, 12)
    torch.testing.assert_close(out.reshape(6, 12).double(), u7_linear_exact(x.reshape(6, 40), w_q, w_s, None),
                               atol=1e-5, rtol=1e-6)


def test_bad_int8_linear_inputs_raise_clear_errors() -> None:
    _, w_q, w_s = int8_weight(6, 32)
    with pytest.raises(ValueError, match="input features"):
        ops.int8_linear(torch.randn(2, 31), w_q, w_s)
    with pytest.raises(TypeError, match="weight has dtype"):
        ops.int8_linear(torch.randn(2, 32), w_q.float(), w_s)
    with pytest.raises(TypeError, match="x has dtype"):
        ops.int8_linear(torch.ones(2, 32, dtype=torch.int8), w_q, w_s)
    with pytest.raises(ValueError, match="weight_scales must have shape"):
        ops.int8_linear(torch.randn(2, 32), w_q, w_s[:5])
    with pytest.raises(TypeError, match="weight_scales has dtype"):
        ops.int8_linear(torch.randn(2, 32), w_q, w_s.double())
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.int8_linear(torch.randn(2, 32), w_q, w_s, torch.randn(7))
    big = torch.zeros(1, ops.INT8_MAX_K + 1, dtype=torch.int8)
    with pytest.raises(ValueError, match="K <= 131072"):
        ops.int8_linear(torch.randn(1, ops.INT8_MAX_K + 1), big, torch.ones(1))


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
    chunks=st.integers(1, 12),
    group_size=st.sampled_from([32, 64, 128]),
)
def test_int4_backends_agree_on_random_shapes(m: int, n: int, chunks: int, group_size: int) -> None:
    # K in 64-channel chunks: odd counts take the vector kernels' single-chunk tail.
    k = 64 * chunks
    assume(k % group_size == 0)
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


@pytest.mark.parametrize("magnitude", [64, 65, 127])
@pytest.mark.parametrize("sign_mix", [False, True])
def test_int8_linear_exact_at_int16_limits(magnitude: int, sign_mix: bool) -> None:
    """All activation codes at 127 against weights at the pairing bound (4 * 64 * 127
    fits int16, 4 * 65 * 127 does not) and beyond: every backend stays exact."""
    n, k = 24, 200
    w_q = torch.full((n, k), magnitude, dtype=torch.int8)
    if sign_mix:
        w_q[::2] *= -1
        w_q[:, 100:] = torch.randint(-127, 128, (n, 100), dtype=torch.int8)
    x = torch.full((3, k), 5.0)
    x[1, :7] = -2.0
    w_s = torch.ones(n)
    want = u7_linear_exact(x, w_q, w_s, None)
    for backend in LINEAR:
        with force_backend(backend):
            out = ops.int8_linear(x, w_q, w_s)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("backend", INT4)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 2, 5])
def test_int4_gemm_extreme_codes_do_not_overflow(backend: str, group_size: int, m: int) -> None:
    """Every nibble 15 against activation codes of +-127 fills the kernels' int16 partial
    sums to their largest values (4 * 2 * 15 * 127 per 128-channel group)."""
    n, k = 10, 512
    q = torch.full((n, k), 15, dtype=torch.uint8)
    q[1::2, :256] = 0
    packed = ops.pack_int4(q)
    scales = torch.full((n, k // group_size), 0.5, dtype=torch.float16)
    zeros = torch.zeros(n, k // group_size, dtype=torch.uint8)
    zeros[3] = 15
    x = torch.ones(m, k)
    x[:, ::3] = -1.0
    with force_backend(backend):
        out = ops.int4_gemm(x, packed, scales, zeros, group_size)
    want = x @ ops.dequantize_int4(packed, scales, zeros, group_size).t()
    torch.testing.assert_close(out, want, atol=1e-3, rtol=1e-5)


def test_int8_linear_accepts_inference_mode_weights() -> None:
    with torch.inference_mode():
        _, w_q, w_s = int8_weight(16, 48)
    x = torch.randn(2, 48)
    want = u7_linear_exact(x, w_q, w_s, None)
    for backend in LINEAR:
        with force_backend(backend), torch.inference_mode():
            out = ops.int8_linear(x, w_q, w_s)
            again = ops.int8_linear(x, w_q, w_s)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-6)
        assert torch.equal(out, again)


@pytest.mark.parametrize("backend", INT4)
@pytest.mark.parametrize("k", [64, 192, 320])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("m", [1, 5])
def test_int4_gemm_odd_chunk_counts(backend: str, k: int, group_size: int, m: int) -> None:
    n = 9
    packed, scales, zeros = ops.quantize_int4(torch.randn(n, k), group_size)
    x = torch.randn(m, k)
    w = ops.dequantize_int4(packed, scales, zeros, group_size)
    with force_backend(backend):
        out = ops.int4_gemm(x, packed, scales, zeros, group_size)
    bound = 0.01 * (x.abs() @ w.abs().t()) + 1e-5
    assert bool(((out - x @ w.t()).abs() <= bound).all())
