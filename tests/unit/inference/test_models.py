"""Our Llama-family model against Hugging Face Transformers on the same random checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from llmo.inference.engine.engine import EngineConfig, LLMEngine
from llmo.inference.engine.params import SamplingParams
from llmo.inference.models.config import ModelLoadError
from llmo.inference.models.loader import load_model
from tests.unit.inference.conftest import CheckpointFactory

PROMPTS = ["To be, or not to be", "Café naïve 日本語", "the slings and arrows of"]
FAMILIES = [
    pytest.param("llama", {}, id="llama"),
    pytest.param("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
                 id="llama3-rope"),
    pytest.param("qwen2", {}, id="qwen2"),
    pytest.param("mistral", {"sliding_window": 8}, id="mistral-sliding"),
]


def _hf(path: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _hf_greedy(hf: Any, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    ids = torch.tensor([prompt])
    out = hf.generate(ids, max_new_tokens=steps, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), [lg[0].float() for lg in out.logits]


@pytest.mark.parametrize(("family", "overrides"), FAMILIES)
def test_fp32_logits_and_greedy_tokens_match_transformers(make_checkpoint: CheckpointFactory, family: str,
                                                          overrides: dict[str, object]) -> None:
    path = make_checkpoint(family, **overrides)
    ours = load_model(path)
    hf = _hf(path, torch.float32)
    prompts = [ours.tokenizer.encode(p) for p in PROMPTS]
    with torch.no_grad():
        for prompt in prompts:
            expected = hf(torch.tensor([prompt])).logits[0]
            got = ours.model.forward_dense(torch.tensor([prompt]))[0]
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    engine = LLMEngine(ours, EngineConfig(num_blocks=64, block_size=8, max_num_batched_tokens=8))
    outputs = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    for prompt, got_ids in zip(prompts, outputs, strict=True):
        expected_ids, _ = _hf_greedy(hf, prompt, 24)
        assert got_ids == expected_ids


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bf16_top5_logprobs_agree_with_transformers(make_checkpoint: CheckpointFactory, family: str) -> None:
    path = make_checkpoint(family, dtype=torch.bfloat16)
    ours = load_model(path)
    assert ours.dtype == torch.bfloat16
    hf = _hf(path, torch.bfloat16)
    engine = LLMEngine(ours, EngineConfig(num_blocks=64, block_size=8))
    for text in PROMPTS:
        prompt = ours.tokenizer.encode(text)
        hf_ids, hf_logits = _hf_greedy(hf, prompt, 16)
        engine.add_request("r", prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=5))
        ours_steps = []
        while engine.has_unfinished():
            for delta in engine.step():
                ours_steps.extend(delta.logprobs)
        # vLLM's check: where the greedy tokens differ, each must be in the other's top 5; stop there.
        for step, (hf_id, ours_lp) in enumerate(zip(hf_ids, ours_steps, strict=True)):
            hf_top5 = torch.topk(hf_logits[step], 5).indices.tolist()
            ours_top5 = [t for t, _ in ours_lp.top]
            assert hf_id in ours_top5 and ours_lp.token_id in hf_top5
            if hf_id != ours_lp.token_id:
                break


def test_tied_embeddings_load(make_checkpoint: CheckpointFactory) -> None:
    path = make_checkpoint("llama", tie_word_embeddings=True)
    ours = load_model(path)
    assert ours.model.lm_head.weight.data_ptr() == ours.model.model.embed_tokens.weight.data_ptr()
    hf = _hf(path, torch.float32)
    ids = torch.tensor([ours.tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        torch.testing.assert_close(ours.model.forward_dense(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def _copy(path: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "ckpt"
    shutil.copytree(path, dest)
    return dest


def test_unsupported_architecture_is_named(make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    path = _copy(make_checkpoint("llama"), tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"unsupported architecture.*GPT2LMHeadModel"):
        load_model(path)


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json", "model.safetensors"])
def test_missing_files_are_named(make_checkpoint: CheckpointFactory, tmp_path: Path, missing: str) -> None:
    path = _copy(make_checkpoint("llama"), tmp_path)
    (path / missing).unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer.json|config.json|safetensors"):
        load_model(path)


def test_bad_shape_is_named(make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    path = _copy(make_checkpoint("llama"), tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"mlp\.\w+_proj\.weight has shape"):
        load_model(path)


def test_missing_directory_and_bad_rope(make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    path = _copy(make_checkpoint("llama"), tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported rope scaling 'yarn'"):
        load_model(path)
