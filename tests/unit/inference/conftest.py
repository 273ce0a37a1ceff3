"""Tiny random-initialised Hugging Face checkpoints written by transformers itself."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune. Café naïve 日本語 emoji 🙂 ünïcödé.\n"
) * 20


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer with a chat template, trained on a short text."""
    out = tmp_path_factory.mktemp("tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",'
        ' "chat_template": "{% for m in messages %}{{ m[\'role\'] }}: {{ m[\'content\'] }}\\n{% endfor %}'
        '{% if add_generation_prompt %}assistant:{% endif %}"}'
    )
    return out


CheckpointFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_files: Path) -> CheckpointFactory:
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    classes: dict[str, Any] = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    cache: dict[tuple[Any, ...], Path] = {}

    def make(family: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any) -> Path:
        key = (family, dtype, seed, json.dumps(overrides, sort_keys=True))
        if key in cache:
            return cache[key]
        kwargs: dict[str, Any] = {
            "vocab_size": 400, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
            "eos_token_id": 0, "bos_token_id": 0, "tie_word_embeddings": False,
        }
        kwargs.update(overrides)
        config = classes[family](**kwargs)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        # Random init gives near-uniform logits; larger weights make greedy decisions well separated.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() == 2:
                    param.normal_(0.0, 0.08 if "embed" not in name else 1.0)
        out = tmp_path_factory.mktemp(f"{family}-ckpt")
        model.save_pretrained(out)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out / name).write_bytes((tokenizer_files / name).read_bytes())
        cache[key] = out
        return out

    return make
