"""The native CPU module itself: every instruction-set path agrees with the reference,
and the module reports and switches its ISA."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import llmo.ops as ops
from llmo.ops import force_backend

from .conftest import ATTN_ATOL, ATTN_RTOL, dense_attention, make_paged_cache

native = pytest.importorskip("llmo_native", reason="llmo_native is not built (make native)")
ISAS = native.available_isas()


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    before = native.isa()
    native.force_isa(request.param)
    try:
        yield request.param
    finally:
        native.force_isa(before)


def test_module_reports_isa_and_threads() -> None:
    assert native.isa() in ISAS
    assert "generic" in ISAS
    assert native.get_num_threads() >= 1
    with pytest.raises(ValueError, match="not available"):
        native.force_isa("no-such-isa")
    with pytest.raises(ValueError, match=">= 1"):
        native.set_num_threads(0)


def test_native_threads_follow_torch_set_num_threads() -> None:
    before = torch.get_num_threads()
    x, w = torch.randn(2, 64), torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            ops.int8_linear(x, w, torch.ones(8))  # any op call picks the change up
            assert native.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_cpu_backend_is_selected_for_cpu_tensors() -> None:
    q = torch.randn(1, 4, 64)
    assert ops.selected_backend("paged_attention_decode", q) == "cpu"
    assert ops.selected_backend("int4_gemm", q) == "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_every_isa(isa: str, dtype: torch.dtype) -> None:
    lens = [3, 50, 0]
    cache = make_paged_cache(lens, 2, 80, 16, dtype)
    q = torch.randn(3, 4, 80)
    with force_backend("cpu"):
        out = ops.paged_attention_decode(q, cache.key_cache, cache.value_cache, cache.block_tables, cache.context_lens)
    for b in range(3):
        torch.testing.assert_close(
            out[b], dense_attention(q[b], cache.keys[b], cache.values[b], 80**-0.5), atol=ATTN_ATOL, rtol=ATTN_RTOL
        )


def test_attention_odd_head_dim_uses_portable_path() -> None:
    cache = make_paged_cache([9], 1, 36, 8, torch.float32)
    q = torch.randn(1, 2, 36)
    with force_backend("cpu"):
        out = ops.paged_attention_decode(q, cache.key_cache, cache.value_cache, cache.block_tables, cache.context_lens)
    torch.testing.assert_close(out[0], dense_attention(q[0], cache.keys[0], cache.values[0], 36**-0.5), atol=ATTN_ATOL, rtol=ATTN_RTOL)


@pytest.mark.parametrize("m", [1, 5, 16])
def test_gemms_every_isa(isa: str, m: int) -> None:
    a = torch.randint(-127, 128, (m, 200), dtype=torch.int8)
    b = torch.randint(-128, 128, (24, 200), dtype=torch.int8)
    with force_backend("cpu"):
        out = ops.int8_gemm(a, b, torch.ones(m), torch.ones(24))
    assert torch.equal(out, (a.double() @ b.double().t()).float())
    for group in (32, 64, 128):
        packed, scales, zeros = ops.quantize_int4(torch.randn(24, 256), group)
        x = torch.randn(m, 256)
        with force_backend("cpu"):
            got = ops.int4_gemm(x, packed, scales, zeros, group)
        want = x @ ops.dequantize_int4(packed, scales, zeros, group).t()
        assert float((got - want).abs().mean() / want.abs().mean()) < 0.01


def test_int4_isas_agree_bit_for_bit_on_integer_parts() -> None:
    """Different ISAs sum the same integer dot products; results differ only by float order."""
    packed, scales, zeros = ops.quantize_int4(torch.randn(40, 512), 128)
    x = torch.randn(3, 512)
    results = []
    before = native.isa()
    try:
        for name in ISAS:
            native.force_isa(name)
            with force_backend("cpu"):
                results.append(ops.int4_gemm(x, packed, scales, zeros, 128))
    finally:
        native.force_isa(before)
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=1e-4, rtol=1e-4)


def test_large_m_int4_matches_on_every_isa(isa: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """AVX2 / generic take dequantize + dense GEMM from INT4_DENSE_MIN_ROWS rows on; AVX-512 keeps its kernel."""
    from llmo.ops import cpu

    packed, scales, zeros = ops.quantize_int4(torch.randn(32, 256), 64)
    x = torch.randn(cpu.INT4_DENSE_MIN_ROWS, 256).to(torch.bfloat16)
    dense_calls: list[int] = []
    real_dequantize = cpu.int4_dequantize

    def counting_dequantize(*args: object) -> torch.Tensor:
        dense_calls.append(1)
        return real_dequantize(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(cpu, "int4_dequantize", counting_dequantize)
    with force_backend("cpu"):
        out = ops.int4_gemm(x, packed, scales, zeros, 64)
    assert bool(dense_calls) == (isa not in cpu.INT4_KERNEL_ONLY_ISAS)
    want = x.float() @ ops.dequantize_int4(packed, scales, zeros, 64).t()
    assert out.dtype == torch.bfloat16
    assert float((out.float() - want).abs().mean() / want.abs().mean()) < 0.02


# 9 and 24 take the AVX-512 8-row tiles; K = 70001 the scalar epilogue (int32 could overflow).
@pytest.mark.parametrize(("m", "k"), [(1, 203), (3, 203), (5, 203), (9, 203), (16, 203), (24, 203), (2, 70001)])
def test_int8_linear_every_isa_is_bit_exact(isa: str, m: int, k: int) -> None:
    x = torch.randn(m, k) + 0.5
    w = torch.randint(-128, 128, (21, k), dtype=torch.int8)
    w_s = torch.rand(21) * 0.01
    bias = torch.randn(21)
    with force_backend("cpu"):
        got = ops.int8_linear(x, w, w_s, bias)
    with force_backend("reference"):
        want = ops.int8_linear(x, w, w_s, bias)
    assert torch.equal(got, want)


def test_int8_native_rejects_too_long_k() -> None:
    with pytest.raises(ValueError, match="K must be <="):
        native.int8_linear(0, 0, 0, 0, 0, 0, 1, 8, native.int8_max_k() + 1)
