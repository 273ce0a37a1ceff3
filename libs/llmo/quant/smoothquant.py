"""SmoothQuant: migrate activation outliers into the weights before W8A8.

For linears sharing an input ``X[.., K]``, per-channel factors
``s_j = max|X_j|^alpha / max|W_{:,j}|^(1-alpha)`` make ``(X / s)(W * s)^T == X W^T``
while flattening activation outliers; ``1 / s`` is folded into the preceding
RMSNorm weight (or producer linear) so inference pays nothing for it.
"""

from __future__ import annotations

import torch


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """Per-input-channel smoothing factors ``s[K]`` (fp32, positive)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if not weights:
        raise ValueError("smooth_scales needs at least one weight")
    k = act_absmax.shape[0]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"weights must be [N, {k}], got {tuple(w.shape)}")
    w_max = torch.cat([w.detach().float().abs() for w in weights], dim=0).amax(dim=0).clamp(min=1e-5)
    a_max = act_absmax.float().clamp(min=1e-5)
    s = a_max.pow(alpha) / w_max.pow(1.0 - alpha)
    return s.clamp(min=1e-5)


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8: ``w ≈ q * scale[:, None]`` (q in [-127, 127])."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(w.shape)}")
    wf = w.detach().float()
    absmax = wf.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(wf / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales
