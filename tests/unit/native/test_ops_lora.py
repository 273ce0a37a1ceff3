"""Batched multi-adapter LoRA: the native CPU kernel, on every instruction-set table,
against the reference loop; the reference against a dense per-row definition; argument errors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmo.ops as ops
from llmo.ops import force_backend

from .conftest import device_backends

BACKENDS = device_backends("batched_lora", "cpu")
HAS_NATIVE = "cpu" in BACKENDS
needs_native = pytest.mark.skipif(not HAS_NATIVE, reason="llmo_native is not built (make native)")
try:
    import llmo_native
except ImportError:
    llmo_native = None
ISAS: list[str] = llmo_native.available_isas() if llmo_native is not None else []
DTYPES = [torch.float32, torch.bfloat16]
# fp32: only the summation order differs. bf16: both sides round out + delta once, from fp32,
# so a result can differ by one bf16 step where the fp32 sums straddle a rounding boundary.
TOL: dict[torch.dtype, tuple[float, float]] = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1e-2)}


def close(got: torch.Tensor, want: torch.Tensor, tol: tuple[float, float]) -> None:
    torch.testing.assert_close(got, want, atol=tol[0], rtol=tol[1])


@dataclass
class Case:
    x: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    indices: torch.Tensor
    scaling: torch.Tensor
    out: torch.Tensor

    def run(self, backend: str) -> torch.Tensor:
        """``out`` after the op on ``backend`` (the case's own ``out`` stays untouched)."""
        out = self.out.clone()
        with force_backend(backend):
            got = ops.batched_lora(self.x, self.lora_a, self.lora_b, self.indices, self.scaling, out)
        assert got is out
        return out


def make_case(
    n: int, k: int, m: int, r: int, s: int, dtype: torch.dtype = torch.float32,
    indices: list[int] | torch.Tensor | None = None, seed: int = 0,
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=gen).to(dtype)
    a = (torch.randn(s, r, k, generator=gen) / max(k, 1) ** 0.5).to(dtype)
    b = torch.randn(s, m, r, generator=gen).to(dtype)
    idx = torch.randint(-1, s, (n,), generator=gen) if indices is None else torch.as_tensor(indices, dtype=torch.int64)
    scaling = torch.rand(s, generator=gen) * 2 + 0.25
    out = torch.randn(n, m, generator=gen).to(dtype)
    return Case(x, a, b, idx, scaling, out)


def dense_definition(case: Case) -> torch.Tensor:
    """The contract row by row in fp64, independent of the reference's grouping."""
    out = case.out.double().clone()
    for i, s in enumerate(case.indices.tolist()):
        if s >= 0:
            a, b = case.lora_a[s].double(), case.lora_b[s].double()
            out[i] += float(case.scaling[s]) * (b @ (a @ case.x[i].double()))
    return out


def assert_matches_reference(case: Case, backend: str = "cpu") -> None:
    got = case.run(backend)
    want = case.run("reference")
    assert got.dtype == case.out.dtype and got.shape == case.out.shape
    close(got.float(), want.float(), TOL[case.out.dtype])
    untouched = case.indices < 0
    assert torch.equal(got[untouched], case.out[untouched])


@pytest.fixture(params=ISAS or ["none"])
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    if llmo_native is None or not HAS_NATIVE:
        pytest.skip("llmo_native is not built (make native)")
    before = llmo_native.isa()
    llmo_native.force_isa(request.param)
    try:
        yield request.param
    finally:
        llmo_native.force_isa(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_matches_the_dense_definition(dtype: torch.dtype) -> None:
    case = make_case(23, 40, 36, 6, 4, dtype, seed=1)
    got = case.run("reference")
    want = dense_definition(case)
    tol = (1e-4, 1e-5) if dtype == torch.float32 else (5e-2, 1e-2)
    close(got.double(), want, tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("n", "k", "m", "r", "s"),
    [
        (1, 64, 64, 8, 1),      # one decode row
        (3, 100, 70, 12, 4),    # K, M not multiples of the vector width; rank tail
        (13, 256, 256, 16, 5),
        (40, 896, 136, 16, 3),  # row chunks beyond 32 rows per slot
        (7, 33, 9, 1, 2),       # rank 1, M tail shorter than 8
        (64, 256, 256, 17, 8),  # large enough to run threaded
    ],
)
def test_native_matches_reference(isa: str, dtype: torch.dtype, n: int, k: int, m: int, r: int, s: int) -> None:
    assert_matches_reference(make_case(n, k, m, r, s, dtype, seed=n + k))


@needs_native
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 70), k=st.integers(1, 300), m=st.integers(1, 300), r=st.integers(1, 20),
    s=st.integers(1, 6), seed=st.integers(0, 2**16), bf16=st.booleans(),
)
def test_native_matches_reference_on_random_shapes(
    n: int, k: int, m: int, r: int, s: int, seed: int, bf16: bool
) -> None:
    assert_matches_reference(make_case(n, k, m, r, s, torch.bfloat16 if bf16 else torch.float32, seed=seed))


@pytest.mark.parametrize("dtype", DTYPES)
def test_runs_of_one_slot_and_unsorted_rows(isa: str, dtype: torch.dtype) -> None:
    # A prefill's run of 19 tokens, decode rows interleaved in any order, base-model rows.
    idx = [2] * 19 + [0, 3, -1, 0, 1, 3, -1, 2, 0] + [1] * 6 + [-1, 3]
    case = make_case(len(idx), 128, 96, 8, 4, dtype, indices=idx, seed=3)
    assert_matches_reference(case)
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(4))
    shuffled = Case(case.x[perm], case.lora_a, case.lora_b, case.indices[perm], case.scaling, case.out[perm])
    close(shuffled.run("cpu").float(), case.run("cpu")[perm].float(), TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_slot(backend: str, dtype: torch.dtype) -> None:
    case = make_case(9, 64, 48, 4, 3, dtype, indices=[1] * 9, seed=5)
    got = case.run(backend)
    close(got.double(), dense_definition(case), TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_without_adapter_are_untouched(backend: str, dtype: torch.dtype) -> None:
    none = make_case(6, 32, 24, 4, 2, dtype, indices=[-1] * 6)
    assert torch.equal(none.run(backend), none.out)
    empty = make_case(0, 32, 24, 4, 2, dtype)
    assert empty.run(backend).shape == (0, 24)
    no_slots = make_case(3, 32, 24, 4, 0, dtype, indices=[-1] * 3)
    assert torch.equal(no_slots.run(backend), no_slots.out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_padded_rank_equals_the_lower_rank_adapter(backend: str, dtype: torch.dtype) -> None:
    low = make_case(12, 96, 80, 5, 2, dtype, indices=[0, 1, 1, 0, -1, 1, 0, 0, 1, 1, 1, 1], seed=6)
    a = torch.zeros(2, 16, 96, dtype=dtype)
    b = torch.zeros(2, 80, 16, dtype=dtype)
    a[:, :5], b[:, :, :5] = low.lora_a, low.lora_b
    padded = Case(low.x, a, b, low.indices, low.scaling, low.out)
    close(padded.run(backend).float(), low.run(backend).float(), TOL[dtype])
    close(padded.run(backend).double(), dense_definition(low), TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_int32_indices(backend: str) -> None:
    case = make_case(10, 48, 40, 6, 3, seed=7)
    want = case.run(backend)
    strided = Case(
        case.x.t().contiguous().t(), case.lora_a.transpose(1, 2).contiguous().transpose(1, 2),
        case.lora_b[:, :, :].transpose(0, 1).contiguous().transpose(0, 1), case.indices.to(torch.int32),
        case.scaling, case.out,
    )
    assert not strided.x.is_contiguous() and not strided.lora_a.is_contiguous()
    torch.testing.assert_close(strided.run(backend), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_updates_out_in_place_and_accumulates(backend: str) -> None:
    case = make_case(5, 32, 16, 4, 2, indices=[0, 1, -1, 1, 0], seed=8)
    out = case.out.clone()
    with force_backend(backend):
        ops.batched_lora(case.x, case.lora_a, case.lora_b, case.indices, case.scaling, out)
        ops.batched_lora(case.x, case.lora_a, case.lora_b, case.indices, case.scaling, out)
    once = dense_definition(case)
    torch.testing.assert_close(out.double(), 2 * once - case.out.double(), atol=1e-4, rtol=1e-5)


@needs_native
def test_native_threads_agree_with_serial_run() -> None:
    case = make_case(96, 512, 384, 16, 4, seed=9)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = case.run("cpu")
        torch.set_num_threads(max(2, before))
        threaded = case.run("cpu")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(threaded, serial, atol=1e-5, rtol=1e-6)
    close(threaded, case.run("reference"), TOL[torch.float32])


def test_selected_backend() -> None:
    case = make_case(2, 16, 8, 2, 1)
    args = (case.x, case.lora_a, case.lora_b, case.indices, case.scaling, case.out)
    assert ops.selected_backend("batched_lora", *args) == ("cpu" if HAS_NATIVE else "reference")
    bf = make_case(2, 16, 8, 2, 1, torch.bfloat16)
    assert ops.selected_backend("batched_lora", bf.x, bf.lora_a, bf.lora_b, bf.indices, bf.scaling, bf.out) == (
        "cpu" if HAS_NATIVE else "reference"
    )
    # fp16 on the CPU runs the reference (the native kernel reads fp32 and bf16).
    half = make_case(2, 16, 8, 2, 1, torch.float16)
    assert ops.selected_backend("batched_lora", half.x, half.lora_a, half.lora_b, half.indices, half.scaling,
                                half.out) == "reference"
    torch.testing.assert_close(half.run("reference").double(), dense_definition(half), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_out_of_range_raise(backend: str) -> None:
    for bad in ([0, 3, -1], [0, -2, 1]):
        case = make_case(3, 16, 8, 2, 3, indices=bad)
        with pytest.raises(ValueError, match=r"indices must lie in \[-1, 3\)"):
            case.run(backend)


def test_bad_arguments_raise_clear_errors() -> None:
    c = make_case(4, 16, 8, 2, 3)
    x, a, b, idx, sc, out = c.x, c.lora_a, c.lora_b, c.indices, c.scaling, c.out

    def call(**kw: object) -> None:
        args: dict[str, object] = {"x": x, "lora_a": a, "lora_b": b, "indices": idx, "scaling": sc, "out": out.clone()}
        args.update(kw)
        ops.batched_lora(**args)  # type: ignore[arg-type]

    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        call(x=[[1.0]])
    with pytest.raises(ValueError, match="x must be 2-D"):
        call(x=x[0])
    with pytest.raises(TypeError, match="x has dtype"):
        call(x=x.double())
    with pytest.raises(ValueError, match=r"lora_a must be \[S, R, K\] with K = 16"):
        call(lora_a=a[:, :, :15])
    with pytest.raises(ValueError, match="lora_a must be 3-D"):
        call(lora_a=a[0])
    with pytest.raises(ValueError, match=r"lora_b must be \[S, M, R\]"):
        call(lora_b=b[:, :, :1])
    with pytest.raises(ValueError, match=r"lora_b must be \[S, M, R\]"):
        call(lora_b=b[:2])
    with pytest.raises(TypeError, match=r"lora_a dtype torch\.bfloat16 must match x dtype torch\.float32"):
        call(lora_a=a.bfloat16())
    with pytest.raises(TypeError, match="lora_b dtype"):
        call(lora_b=b.bfloat16())
    with pytest.raises(TypeError, match="indices has dtype"):
        call(indices=idx.float())
    with pytest.raises(ValueError, match=r"indices must have shape \(4,\)"):
        call(indices=idx[:3])
    with pytest.raises(ValueError, match=r"scaling must have shape \(3,\)"):
        call(scaling=sc[:2])
    with pytest.raises(TypeError, match="scaling has dtype"):
        call(scaling=sc.double())
    with pytest.raises(ValueError, match=r"out must have shape \(4, 8\)"):
        call(out=torch.zeros(4, 9))
    with pytest.raises(TypeError, match="out dtype"):
        call(out=torch.zeros(4, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be contiguous"):
        call(out=torch.zeros(8, 4).t())
    with pytest.raises(ValueError, match="one device"):
        call(indices=idx.to("meta"))
