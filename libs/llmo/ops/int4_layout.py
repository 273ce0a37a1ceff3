"""The project's packed INT4 weight layout ("llmo-int4-v1").

A weight ``W[N, K]`` is quantized asymmetrically per group of ``group_size``
consecutive input channels: ``W ≈ (q - zero) * scale`` with ``q`` in 0..15.
``K`` must be a multiple of 64 and of ``group_size`` (32, 64 or 128).

Packing: ``packed[N, K // 2]`` (uint8). Each row is cut into chunks of 64
input channels; byte ``j`` (0..31) of chunk ``c`` holds ``q[64c + j]`` in its
low nibble and ``q[64c + 32 + j]`` in its high nibble. With this order one
32-byte load unpacks (AND / shift) into two runs of 32 consecutive channels,
so SIMD kernels multiply against contiguous activations without shuffles.

``scales[N, K // group_size]`` (fp16/bf16/fp32) and
``zeros[N, K // group_size]`` (uint8, 0..15) complete the format.
"""

from __future__ import annotations

import torch

CHUNK = 64
GROUP_SIZES = (32, 64, 128)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack ``q[N, K]`` (integers 0..15, any integer dtype) into ``[N, K // 2]`` uint8."""
    if q.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D tensor, got shape {tuple(q.shape)}")
    n, k = q.shape
    if k % CHUNK:
        raise ValueError(f"pack_int4 needs K divisible by {CHUNK}, got K={k}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("pack_int4 values must lie in 0..15")
    chunks = q.to(torch.uint8).reshape(n, k // CHUNK, 2, CHUNK // 2)
    packed = chunks[:, :, 0, :] | (chunks[:, :, 1, :] << 4)
    return packed.reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[N, K // 2]`` uint8 -> ``[N, K]`` uint8."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError("unpack_int4 expects a 2-D uint8 tensor")
    n, half = packed.shape
    if (2 * half) % CHUNK:
        raise ValueError(f"packed row length {half} is not a whole number of {CHUNK}-channel chunks")
    chunks = packed.reshape(n, (2 * half) // CHUNK, CHUNK // 2)
    lo = chunks & 0x0F
    hi = chunks >> 4
    return torch.stack([lo, hi], dim=2).reshape(n, 2 * half)


def dequantize_int4(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Dequantize to an fp32 ``[N, K]`` weight."""
    q = unpack_int4(packed).to(torch.float32)
    n, k = q.shape
    groups = k // group_size
    q = q.reshape(n, groups, group_size)
    w = (q - zeros.to(torch.float32).reshape(n, groups, 1)) * scales.to(torch.float32).reshape(n, groups, 1)
    return w.reshape(n, k)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric group quantization of ``w[N, K]``.

    Returns ``(packed uint8 [N, K//2], scales fp16 [N, K//g], zeros uint8 [N, K//g])``.
    """
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if w.dim() != 2 or w.shape[1] % CHUNK or w.shape[1] % group_size:
        raise ValueError(f"weight must be [N, K] with K divisible by {CHUNK} and {group_size}")
    n, k = w.shape
    wg = w.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    wmax = wg.amax(dim=2).clamp(min=0.0)
    wmin = wg.amin(dim=2).clamp(max=0.0)
    scales = ((wmax - wmin) / 15.0).clamp(min=1e-8)
    scales16 = scales.to(torch.float16).clamp(min=torch.finfo(torch.float16).tiny)
    s = scales16.to(torch.float32)
    zeros = torch.round(-wmin / s).clamp(0, 15)
    q = torch.round(wg / s.unsqueeze(2) + zeros.unsqueeze(2)).clamp(0, 15)
    return pack_int4(q.reshape(n, k)), scales16, zeros.to(torch.uint8)
