"""Perplexity of a loaded model on a text (quantization accuracy checks)."""

from __future__ import annotations

import math

import torch

from llmo.inference.models.loader import LoadedModel


@torch.inference_mode()
def perplexity(loaded: LoadedModel, text: str, window: int = 256, batch: int = 8) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `window` tokens."""
    ids = torch.tensor(loaded.tokenizer.encode(text, add_special_tokens=False), dtype=torch.int64)
    n = (len(ids) - 1) // window
    if n < 1:
        raise ValueError(f"text is too short: {len(ids)} tokens, need more than {window}")
    xs = ids[: n * window].view(n, window)
    ys = ids[1 : n * window + 1].view(n, window)
    total = 0.0
    for i in range(0, n, batch):
        logits = loaded.model.forward_dense(xs[i : i + batch]).float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ys[i : i + batch].flatten(),
                                                         reduction="sum"))
    return math.exp(total / ys.numel())
