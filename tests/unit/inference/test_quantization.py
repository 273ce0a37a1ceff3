"""INT8 (W8A8) and INT4 (group-wise weight-only) on the demo model's held-out text.

The text is the last 12 kB of Tiny Shakespeare (public domain), inside the held-out split
the demo model never trained on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmo.inference.engine.engine import EngineConfig, LLMEngine
from llmo.inference.engine.params import SamplingParams
from llmo.inference.models.config import ModelLoadError
from llmo.inference.models.loader import load_model
from llmo.inference.models.perplexity import perplexity
from llmo.inference.models.quantize import Int4Linear, Int8Linear
from tests.unit.inference.conftest import CheckpointFactory

HELDOUT = (Path(__file__).parent / "data" / "heldout_tail.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def fp32_perplexity() -> float:
    return perplexity(load_model(), HELDOUT)


def test_int8_perplexity_within_1_percent(fp32_perplexity: float) -> None:
    loaded = load_model(quantization="int8")
    assert isinstance(loaded.model.model.layers[0].mlp.up_proj, Int8Linear)
    assert perplexity(loaded, HELDOUT) <= fp32_perplexity * 1.01


def test_int4_perplexity_within_5_percent_and_serves(fp32_perplexity: float) -> None:
    loaded = load_model(quantization="int4")
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj, Int4Linear)
    assert loaded.quantization == "int4"
    assert perplexity(loaded, HELDOUT) <= fp32_perplexity * 1.05
    engine = LLMEngine(loaded, EngineConfig(num_blocks=32))
    (out,) = engine.generate([loaded.tokenizer.encode("ROMEO:\n")], SamplingParams(max_tokens=6, temperature=0,
                                                                                  ignore_eos=True))
    assert len(out) == 6


def test_int4_rejects_unaligned_shapes(make_checkpoint: CheckpointFactory) -> None:
    # hidden 64 works, intermediate 96 is not a multiple of 64 for down_proj's input.
    path = make_checkpoint("llama", intermediate_size=96)
    with pytest.raises(ModelLoadError, match="int4 needs in_features divisible by 64"):
        load_model(path, quantization="int4")
    with pytest.raises(ModelLoadError, match="unsupported quantization"):
        load_model(path, quantization="fp8")


@pytest.mark.parametrize(("method", "limit"), [("smoothquant-int8", 1.01), ("awq-int4", 1.05)])
def test_llmo_quant_checkpoints_load_and_keep_perplexity(tmp_path: Path, fp32_perplexity: float, method: str,
                                                         limit: float) -> None:
    from llmo.inference.models.loader import DEMO_MODEL_DIR
    from llmo.quant.tool import quantize_checkpoint

    out = tmp_path / method
    quantize_checkpoint(DEMO_MODEL_DIR, out, method, group_size=64, samples=4, seq_len=64)
    loaded = load_model(out)
    assert loaded.quantization == ("int8" if method.endswith("int8") else "int4")
    assert perplexity(loaded, HELDOUT) <= fp32_perplexity * limit
    with pytest.raises(ModelLoadError, match="already quantized"):
        load_model(out, quantization="int8")


def test_broken_quantized_checkpoint_is_named(tmp_path: Path) -> None:
    import json

    from safetensors.torch import load_file, save_file

    from llmo.inference.models.loader import DEMO_MODEL_DIR
    from llmo.quant.tool import quantize_checkpoint

    out = tmp_path / "q"
    quantize_checkpoint(DEMO_MODEL_DIR, out, "rtn-int4", group_size=64)
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.qzeros"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.qzeros"):
        load_model(out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported quantization_config 'gptq'"):
        load_model(out)
