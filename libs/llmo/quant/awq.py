"""AWQ-style activation-aware INT4 quantization.

Channels that see large activations matter most. For linears sharing an input
``X``, search ``s = mean|X_j|^r`` over a grid of ``r`` in [0, 1], quantize
``W * s`` per group (asymmetric, 4 bits) and keep the ``s`` whose output
``(X / s) Q(W * s)^T`` is closest to ``X W^T``. ``r = 0`` is plain round-to-nearest,
so the search never does worse than RTN on the calibration data.
"""

from __future__ import annotations

import torch

from llmo.ops.int4_layout import dequantize_int4, quantize_int4


def _fake_quant(w: torch.Tensor, group_size: int) -> torch.Tensor:
    packed, scales, zeros = quantize_int4(w, group_size)
    return dequantize_int4(packed, scales, zeros, group_size)


def awq_search(
    x: torch.Tensor, weights: list[torch.Tensor], group_size: int, grid: int = 20
) -> tuple[torch.Tensor, float, float]:
    """Best per-input-channel scale ``s[K]`` for ``weights`` fed by calibration rows ``x[n, K]``.

    Returns ``(s, best_error, rtn_error)`` where errors are output MSEs.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError("calibration activations must be a non-empty [n, K] matrix")
    if grid < 1:
        raise ValueError("grid must be >= 1")
    xf = x.detach().float()
    w = torch.cat([wi.detach().float() for wi in weights], dim=0)
    if w.shape[1] != xf.shape[1]:
        raise ValueError(f"weights have K={w.shape[1]} but activations have K={xf.shape[1]}")
    want = xf @ w.t()
    x_mean = xf.abs().mean(dim=0).clamp(min=1e-6)
    best_s = torch.ones_like(x_mean)
    best_err = rtn_err = float("inf")
    for i in range(grid + 1):
        ratio = i / grid
        s = x_mean.pow(ratio)
        s = s / (s.max() * s.min()).sqrt()
        got = (xf / s) @ _fake_quant(w * s, group_size).t()
        err = float((got - want).pow(2).mean())
        if i == 0:
            rtn_err = err
        if err < best_err:
            best_err, best_s = err, s
    return best_s, best_err, rtn_err


def quantize_int4_awq(
    w: torch.Tensor, s: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w * s`` (the caller folds ``1 / s`` into the producer of the input)."""
    return quantize_int4(w.detach().float() * s.float(), group_size)
