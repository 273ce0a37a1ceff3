"""Loss, perplexity and greedy-generation speed of a causal LM (plain, PEFT or quantized)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from llmo.tune.data import IGNORE_INDEX, Example, batches, collate


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over labelled positions, and their count.
    Position ``t`` predicts label ``t + 1``."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    targets = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((targets != IGNORE_INDEX).sum())


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.logits  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Perplexity:
    loss: float  # mean NLL per labelled token (nats)
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else float("nan")


@torch.no_grad()
def perplexity(model: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 8,
               device: torch.device | str = "cpu") -> Perplexity:
    """Perplexity over the labelled tokens of ``examples`` (completion tokens of prompt/completion pairs)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for group in batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in collate(group, pad_id).items()}
        nll, n = token_nll(forward_logits(model, batch), batch["labels"])
        total += float(nll)
        count += n
    model.train(was_training)
    return Perplexity(total / count if count else float("nan"), count)


@dataclass(frozen=True)
class GenerationSpeed:
    prompts: int
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


@torch.no_grad()
def greedy_speed(model: PreTrainedModel, prompts: Sequence[list[int]], new_tokens: int, pad_id: int,
                 device: torch.device | str = "cpu") -> GenerationSpeed:
    """Greedy decoding (KV cache, batch 1, exactly ``new_tokens`` per prompt); one warm-up
    prompt is run first and not counted."""
    from transformers import GenerationConfig

    model.eval()
    # Greedy, whatever the checkpoint's generation_config.json asks for (transformers merges
    # the model's own config into the one passed, so it is swapped for the measurement).
    greedy = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=pad_id, use_cache=True)
    saved = model.generation_config
    # mypy resolves `generate` through nn.Module.__getattr__ (a Tensor); it is GenerationMixin's.
    generate = cast(Callable[..., torch.Tensor], model.generate)

    def run(ids: list[int]) -> int:
        inputs = torch.tensor([ids], device=device)
        out = generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), generation_config=greedy)
        return int(out.shape[1] - inputs.shape[1])

    model.generation_config = greedy
    try:
        run(list(prompts[0]))
        began = time.perf_counter()
        produced = sum(run(list(p)) for p in prompts)
        elapsed = time.perf_counter() - began
    finally:
        model.generation_config = saved
    return GenerationSpeed(len(prompts), produced, elapsed)
