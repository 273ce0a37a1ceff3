"""`llmo tune ...`: results as JSON, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from llmo.cli.main import cli

from .conftest import WORDS


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["tune", *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_lora_prints_the_result_as_json(tiny_llama: Path, pairs: Path, tmp_path: Path) -> None:
    code, output = run("lora", "--base", str(tiny_llama), "--data", str(pairs), "--output", str(tmp_path / "a"),
                       "--max-steps", "2", "--batch-size", "4", "--max-length", "32", "--rank", "2",
                       "--target-modules", "q_proj,v_proj", "--threads", "1", "--json")
    assert code == 0, output
    result = json.loads(output.strip().splitlines()[-1])
    assert result["steps"] == 2 and result["quantize"] is None
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 2


def test_qlora_table_output(tiny_llama: Path, pairs: Path, tmp_path: Path) -> None:
    code, output = run("qlora", "--base", str(tiny_llama), "--data", str(pairs), "--output", str(tmp_path / "q"),
                       "--max-steps", "1", "--batch-size", "4", "--max-length", "32", "--threads", "1")
    assert code == 0, output
    assert "qlora adapter" in output and "eval perplexity" in output and "1 steps" in output


def test_a_directory_that_is_not_a_llama_checkpoint(pairs: Path, tmp_path: Path) -> None:
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    code, output = run("lora", "--base", str(gpt2), "--data", str(pairs), "--output", str(tmp_path / "o"))
    assert code == 1
    assert "is not a Llama checkpoint" in output and "Traceback" not in output
    empty = tmp_path / "empty"
    empty.mkdir()
    code, output = run("qlora", "--base", str(empty), "--data", str(pairs), "--output", str(tmp_path / "o"))
    assert code == 1 and "has no config.json" in output


def test_a_bad_dataset_line_is_named(tiny_llama: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "the cat"}\n{"text": "the dog"}\n{"prompt": "x"}\n')
    code, output = run("lora", "--base", str(tiny_llama), "--data", str(data), "--output", str(tmp_path / "o"))
    assert code == 1 and "line 3" in output and '"completion" must be a non-empty string' in output
    data.write_text("\n".join(['{"text": "the cat sat"}'] * 6 + ["not json"]) + "\n")
    code, output = run("lora", "--base", str(tiny_llama), "--data", str(data), "--output", str(tmp_path / "o"),
                       "--skip-bad-lines", "--max-steps", "1", "--max-length", "16", "--eval-fraction", "0.2",
                       "--json")
    assert code == 0, output
    assert json.loads(output.strip().splitlines()[-1])["skipped_lines"] == [
        {"line": 7, "reason": "not valid JSON (Expecting value at column 1)"}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_cuda_without_a_gpu_is_a_clear_error(tiny_llama: Path, pairs: Path, tmp_path: Path) -> None:
    code, output = run("lora", "--base", str(tiny_llama), "--data", str(pairs), "--output", str(tmp_path / "o"),
                       "--device", "cuda")
    assert code == 1 and "CUDA is not available" in output


def test_distill_prints_sizes_and_speed(tiny_llama: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(WORDS * 8)
    code, output = run("distill", "--teacher", str(tiny_llama), "--corpus", str(corpus), "--output",
                       str(tmp_path / "s"), "--layers", "1", "--steps", "2", "--batch-size", "2", "--max-length",
                       "32", "--speed-prompts", "1", "--speed-tokens", "2", "--threads", "1", "--json")
    assert code == 0, output
    result = json.loads(output.strip().splitlines()[-1])
    assert result["student_config"]["num_hidden_layers"] == 1 and result["size_ratio"] < 1
    code, output = run("distill", "--teacher", str(tiny_llama), "--corpus", str(corpus), "--output",
                       str(tmp_path / "s2"), "--hidden", "60", "--heads", "8")
    assert code == 1 and "multiple of the head count" in output
