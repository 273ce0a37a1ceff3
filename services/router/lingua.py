"""Token-level prompt pruning scored by a small local causal LM (in the spirit of LLMLingua):
tokens the model finds predictable (low surprisal) carry little information and are dropped
first; the first token and the order of kept tokens are preserved.

Any local Hugging Face causal-LM directory works (the project's own demo model by default);
nothing is downloaded.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PruneTokensResult:
    text: str
    tokens_before: int
    tokens_after: int

    @property
    def tokens_saved(self) -> int:
        return self.tokens_before - self.tokens_after


def default_model_dir() -> Path | None:
    """The inference service's bundled demo model, if this install has it."""
    try:
        import llmo.inference.demo_model as demo
    except ImportError:
        return None
    path = Path(demo.__file__).parent
    return path if (path / "config.json").exists() else None


class SurprisalPruner:
    def __init__(self, model_dir: Path, max_tokens: int = 512) -> None:
        self.model_dir = Path(model_dir)
        self.max_tokens = max_tokens
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any] | None = None

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._loaded is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
                from transformers import AutoModelForCausalLM, AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(self.model_dir))
                model = AutoModelForCausalLM.from_pretrained(str(self.model_dir))
                model.eval()
                self._loaded = (tok, model)
            return self._loaded

    def surprisal(self, text: str) -> tuple[list[int], np.ndarray]:
        """Token ids of `text` and each token's surprisal in nats (the first one is +inf)."""
        import torch

        tok, model = self._load()
        ids: list[int] = tok(text, add_special_tokens=False)["input_ids"]
        scores = np.full(len(ids), np.inf)
        # Windows of max_tokens: each token is scored given up to max_tokens - 1 predecessors.
        for start in range(0, len(ids), self.max_tokens):
            window = ids[max(0, start - 1) : start + self.max_tokens]
            if len(window) < 2:
                continue
            with torch.no_grad():
                logits = model(torch.tensor([window])).logits[0, :-1]
            logp = torch.log_softmax(logits.float(), dim=-1)
            nll = -logp.gather(1, torch.tensor(window[1:]).unsqueeze(1)).squeeze(1).numpy()
            offset = max(0, start - 1) + 1
            scores[offset : offset + len(nll)] = nll
        return ids, scores

    def prune(self, text: str, keep_ratio: float) -> PruneTokensResult:
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError("keep_ratio must be in (0, 1]")
        tok, _ = self._load()
        ids, scores = self.surprisal(text)
        n = len(ids)
        keep_n = max(1, round(n * keep_ratio))
        if keep_n >= n:
            return PruneTokensResult(text, n, n)
        keep = np.sort(np.argsort(-scores, kind="stable")[:keep_n])
        out = tok.decode([ids[i] for i in keep], skip_special_tokens=True)
        return PruneTokensResult(out, n, keep_n)
