"""The bundled demo model: shipped, small, loadable by us and by transformers with the same logits."""

from __future__ import annotations

from pathlib import Path

import torch

from llmo.inference.engine.engine import EngineConfig, LLMEngine
from llmo.inference.engine.params import SamplingParams
from llmo.inference.models.loader import DEMO_MODEL_DIR, load_model


def test_demo_model_ships_and_loads() -> None:
    loaded = load_model()
    assert loaded.config.architecture == "LlamaForCausalLM"
    assert sum(p.numel() for p in loaded.model.parameters()) > 1_000_000
    assert sum(f.stat().st_size for f in Path(loaded.path).iterdir()) < 20 * 1024 * 1024
    engine = LLMEngine(loaded, EngineConfig(num_blocks=64))
    (out,) = engine.generate([loaded.tokenizer.encode("ROMEO:\n")], SamplingParams(max_tokens=8, temperature=0))
    assert out


def test_transformers_loads_the_demo_model_with_the_same_logits() -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    ours = load_model()
    hf = LlamaForCausalLM.from_pretrained(DEMO_MODEL_DIR).eval()
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    text = "ROMEO:\nWhat light through yonder window breaks?"
    assert tok.encode(text) == ours.tokenizer.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        ours.tokenizer.apply_chat_template(chat))
    ids = torch.tensor([ours.tokenizer.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(ours.model.forward_dense(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
