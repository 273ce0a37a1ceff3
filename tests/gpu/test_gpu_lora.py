"""Batched multi-adapter LoRA on a GPU: the ``cuda`` backend on CUDA tensors against the
reference computed on the CPU. Run with ``pytest -m gpu tests/gpu``; skipped where no NVIDIA
GPU is visible."""

from __future__ import annotations

import pytest
import torch

import llmo.ops as ops
from llmo.ops import force_backend, get_op

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)"),
]

TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-3, 1e-4),
    torch.bfloat16: (3e-2, 1e-2),
    torch.float16: (1e-2, 2e-3),
}


def close(got: torch.Tensor, want: torch.Tensor, tol: tuple[float, float]) -> None:
    torch.testing.assert_close(got, want, atol=tol[0], rtol=tol[1])


def cuda_backend() -> str:
    override = get_op("batched_lora").overrides.get("cuda")
    if override is None or not override.available():
        pytest.skip("the cuda backend of batched_lora cannot load here")
    return "cuda"


def case(
    n: int, k: int, m: int, r: int, s: int, dtype: torch.dtype, indices: list[int] | None = None, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=gen).to(dtype)
    a = (torch.randn(s, r, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(s, m, r, generator=gen).to(dtype)
    idx = torch.randint(-1, s, (n,), generator=gen) if indices is None else torch.tensor(indices, dtype=torch.int64)
    scaling = torch.rand(s, generator=gen) * 2 + 0.25
    out = torch.randn(n, m, generator=gen).to(dtype)
    return x, a, b, idx, scaling, out


def run_both(args: tuple[torch.Tensor, ...], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` after the op on the GPU (``backend``) and after the reference on the CPU."""
    x, a, b, idx, scaling, out = args
    want = out.clone()
    with force_backend("reference"):
        ops.batched_lora(x, a, b, idx, scaling, want)
    got = out.cuda()
    with force_backend(backend):
        returned = ops.batched_lora(x.cuda(), a.cuda(), b.cuda(), idx.cuda(), scaling.cuda(), got)
    assert returned is got
    return got.cpu(), want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("n", "k", "m", "r", "s"),
    [(1, 64, 64, 8, 1), (32, 896, 896, 16, 32), (256, 896, 896, 16, 8), (7, 100, 300, 40, 3), (5, 33, 9, 1, 2)],
)
def test_batched_lora_on_gpu(dtype: torch.dtype, n: int, k: int, m: int, r: int, s: int) -> None:
    backend = cuda_backend()
    args = case(n, k, m, r, s, dtype, seed=n + m)
    got, want = run_both(args, backend)
    close(got.float(), want.float(), TOL[dtype])
    untouched = args[3] < 0
    assert torch.equal(got[untouched], args[5][untouched])


def test_batched_lora_on_gpu_runs_and_padding() -> None:
    backend = cuda_backend()
    idx = [2] * 19 + [0, 3, -1, 0, 1, 3, -1, 2, 0] + [1] * 6
    got, want = run_both(case(len(idx), 128, 96, 8, 4, torch.float32, indices=idx, seed=3), backend)
    close(got, want, TOL[torch.float32])
    x, a, b, ids, sc, out = case(6, 64, 48, 5, 2, torch.float32, indices=[0, 1, -1, 1, 0, 0], seed=4)
    a_pad, b_pad = torch.zeros(2, 16, 64), torch.zeros(2, 48, 16)
    a_pad[:, :5], b_pad[:, :, :5] = a, b
    got_pad, _ = run_both((x, a_pad, b_pad, ids, sc, out), backend)
    close(got_pad, run_both((x, a, b, ids, sc, out), backend)[1], TOL[torch.float32])


def test_batched_lora_on_gpu_all_rows_without_adapter() -> None:
    backend = cuda_backend()
    args = case(4, 32, 24, 4, 2, torch.bfloat16, indices=[-1] * 4)
    got, _ = run_both(args, backend)
    assert torch.equal(got, args[5])
    assert ops.selected_backend("batched_lora", *(t.cuda() for t in args)) == "cuda"
