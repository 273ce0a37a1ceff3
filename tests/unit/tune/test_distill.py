"""Distillation writes a smaller student checkpoint that transformers and the inference engine load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmo.tune.distill import (
    DistillConfig,
    StudentShape,
    distill,
    distill_loss,
    spread_layers,
    student_config,
)

from .conftest import WORDS

torch.set_num_threads(1)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(WORDS * 12)
    return path


def test_distill_writes_a_smaller_loadable_student(tiny_llama: Path, corpus: Path, tmp_path: Path) -> None:
    output = tmp_path / "student"
    result = distill(DistillConfig(teacher=tiny_llama, corpus=corpus, output=output, student=StudentShape(layers=1),
                                   steps=6, batch_size=4, max_length=32, lr=5e-3, speed_prompts=2, speed_tokens=4))
    assert result.steps == 6 and result.init == "teacher"
    assert result.student_config["num_hidden_layers"] == 1
    assert result.student.parameters < result.teacher.parameters
    assert result.student.eval_perplexity > 0 and result.student.greedy_tokens_per_s > 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "distill_summary.json"):
        assert (output / name).is_file(), name
    assert json.loads((output / "distill_summary.json").read_text())["size_ratio"] < 1

    student = LlamaForCausalLM.from_pretrained(str(output)).eval()
    assert student.config.num_hidden_layers == 1
    assert sum(p.numel() for p in student.parameters()) == result.student.parameters

    # The serving engine loads the same directory and computes the same logits.
    from llmo.inference.models.loader import load_model

    served = load_model(output)
    assert served.config.num_layers == 1
    ids = torch.tensor([[3, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(served.model.forward_dense(ids), student(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_a_narrower_student_starts_at_random(tiny_llama: Path, corpus: Path, tmp_path: Path) -> None:
    result = distill(DistillConfig(teacher=tiny_llama, corpus=corpus, output=tmp_path / "narrow",
                                   student=StudentShape(layers=1, hidden=32, heads=2, kv_heads=1), steps=2,
                                   batch_size=4, max_length=32, speed_prompts=1, speed_tokens=2))
    assert result.init == "random"
    assert result.student_config["hidden_size"] == 32 and result.student_config["head_dim"] == 16
    assert result.student_config["intermediate_size"] == 64  # scaled with the hidden size


def test_student_shape_is_validated() -> None:
    teacher = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=100)
    assert student_config(teacher, StudentShape()).num_hidden_layers == 2
    with pytest.raises(ValueError, match="multiple of the head count"):
        student_config(teacher, StudentShape(hidden=60, heads=8))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        student_config(teacher, StudentShape(heads=4, kv_heads=3))


def test_spread_layers_keeps_the_first_and_last() -> None:
    assert spread_layers(4, 2) == [0, 3]
    assert spread_layers(6, 3) == [0, 2, 5]
    assert spread_layers(4, 1) == [0]


def test_distill_loss_is_zero_kl_for_identical_logits() -> None:
    logits = torch.randn(2, 5, 11)
    batch = {"attention_mask": torch.ones(2, 5, dtype=torch.long), "labels": torch.randint(0, 11, (2, 5))}
    _, kl, lm = distill_loss(logits, logits.clone(), batch, temperature=2.0, alpha=0.5)
    assert abs(kl) < 1e-6 and lm > 0
    _, kl_far, _ = distill_loss(logits, -logits, batch, temperature=2.0, alpha=0.5)
    assert kl_far > 0.1
