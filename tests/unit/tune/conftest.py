"""A tiny random Llama checkpoint (transformers save_pretrained + a BPE tokenizer trained here)
and small datasets, built once per session in a temp dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

EOT = "<|endoftext|>"
WORDS = ("the cat sat on the mat and the dog ran to the park while two plus three is five "
         "and four plus four is eight so the answer is nine ")


def _tokenizer(text: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def write_tiny_llama(root: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """hidden 64 / intermediate 128, so every projection fits the INT4 format (K % 64 == 0)."""
    root.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(WORDS * 20)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "pad_token": EOT, "bos_token": EOT}))
    eot = tok.token_to_id(EOT)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=256, bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(root))
    return root


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def write_pairs(path: Path, count: int = 48) -> Path:
    """Prompt/completion lines with a learnable pattern (the answer repeats the prompt's words)."""
    lines = []
    subjects = ["cat", "dog", "mat", "park"]
    for i in range(count):
        a, b = subjects[i % 4], subjects[(i // 4) % 4]
        lines.append(json.dumps({"prompt": f"the {a} and the {b} ", "completion": f"so the answer is the {a} {b}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    return write_pairs(tmp_path / "pairs.jsonl")
