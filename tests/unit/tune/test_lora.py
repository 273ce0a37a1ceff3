"""LoRA and QLoRA training on a tiny random Llama: loss falls, the PEFT adapter reloads with the
same logits, and an interrupted run resumes to exactly the uninterrupted result."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from llmo.tune.base import load_llama, load_tokenizer
from llmo.tune.checkpoints import ResumeError, checkpoint_dirs
from llmo.tune.data import read_jsonl, split_eval, tokenize
from llmo.tune.events import Event
from llmo.tune.lora import LoraSpec, TrainConfig, load_adapter, train
from llmo.tune.metrics import perplexity
from llmo.tune.quant4 import Int4Linear

torch.set_num_threads(1)


def config(base: Path, data: Path, output: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = {"lora": LoraSpec(rank=4, alpha=8, dropout=0.1), "lr": 1e-2, "epochs": 2,
                                   "batch_size": 8, "max_length": 32, "eval_fraction": 0.2, "seed": 7,
                                   "checkpoint_every": 0}
    settings.update(overrides)
    return TrainConfig(base=base, data=data, output=output, **settings)  # type: ignore[arg-type]


def eval_set_of(cfg: TrainConfig) -> list:  # type: ignore[type-arg]
    tok = load_tokenizer(cfg.base)
    _, held = split_eval(read_jsonl(cfg.data).records, cfg.eval_fraction, cfg.seed)
    return tokenize(held, tok, tok.eos_id, cfg.max_length)


def sample_ids(cfg: TrainConfig) -> torch.Tensor:
    tok = load_tokenizer(cfg.base)
    return torch.tensor([tok.encode("the cat and the dog so the answer is")])


def test_lora_lowers_eval_perplexity_and_saves_a_peft_adapter(tiny_llama: Path, pairs: Path, tmp_path: Path) -> None:
    cfg = config(tiny_llama, pairs, tmp_path / "adapter")
    tok = load_tokenizer(tiny_llama)
    before = perplexity(load_llama(tiny_llama), eval_set_of(cfg), tok.pad_id).perplexity
    events: list[Event] = []
    result = train(cfg, events.append)

    assert result.steps == result.total_steps == 10  # 39 training lines / 8 per batch, 2 epochs
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.final_eval_perplexity is not None and result.final_eval_perplexity < 0.5 * before
    assert [e.kind for e in events].count("eval") == 2
    assert (cfg.output / "adapter_config.json").is_file() and (cfg.output / "adapter_model.safetensors").is_file()
    assert not (cfg.output / "checkpoints").exists()
    summary = json.loads((cfg.output / "training_summary.json").read_text())
    assert summary["steps"] == 10 and summary["trainable_parameters"] == result.trainable_parameters
    adapter_config = json.loads((cfg.output / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"}

    ids = sample_ids(cfg)
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(tiny_llama)), str(cfg.output)).eval()
    base = LlamaForCausalLM.from_pretrained(str(tiny_llama)).eval()
    assert result.model is not None
    with torch.no_grad():
        trained_logits = result.model(input_ids=ids).logits
        reloaded_logits = reloaded(input_ids=ids).logits
        base_logits = base(input_ids=ids).logits
    torch.testing.assert_close(reloaded_logits, trained_logits, rtol=0, atol=1e-5)
    assert (reloaded_logits - base_logits).abs().max() > 1e-2


def test_the_adapter_file_is_plain_lora_math(tiny_llama: Path, pairs: Path, tmp_path: Path) -> None:
    """W + (alpha / r) * B @ A from the safetensors file reproduces PEFT's logits."""
    cfg = config(tiny_llama, pairs, tmp_path / "adapter", epochs=1, lora=LoraSpec(rank=4, alpha=8, dropout=0.0,
                                                                                 target_modules=("q_proj", "v_proj")))
    result = train(cfg)
    tensors = load_file(str(cfg.output / "adapter_model.safetensors"))
    merged = LlamaForCausalLM.from_pretrained(str(tiny_llama)).eval()
    state = merged.state_dict()
    prefix = "base_model.model."
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        module = key.removeprefix(prefix).removesuffix(".lora_A.weight")
        delta = tensors[key.replace("lora_A", "lora_B")] @ tensors[key] * (8.0 / 4)
        state[f"{module}.weight"] += delta
    assert len([k for k in tensors if k.endswith("lora_A.weight")]) == 2 * 2  # 2 layers x (q, v)
    merged.load_state_dict(state)
    ids = sample_ids(cfg)
    assert result.model is not None
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, result.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


class Interrupt(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run(tiny_llama: Path, pairs: Path, tmp_path: Path) -> None:
    whole = train(config(tiny_llama, pairs, tmp_path / "whole", checkpoint_every=3))
    cut = config(tiny_llama, pairs, tmp_path / "cut", checkpoint_every=3, keep_checkpoints=1)

    def stop_at_six(event: Event) -> None:  # mid second epoch, right after the second checkpoint
        if event.kind == "checkpoint" and event.step == 6:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cut, stop_at_six)
    assert [p.name for p in checkpoint_dirs(cut.output / "checkpoints")] == ["step-00000006"]
    with pytest.raises(ResumeError, match="pass resume"):
        train(cut)
    with pytest.raises(ResumeError, match=r"lr: checkpoint 0\.01, now 0\.02"):
        train(replace(cut, resume=True, lr=2e-2))

    resumed = train(replace(cut, resume=True))
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "step-00000006"
    assert resumed.steps == whole.steps
    assert resumed.history == whole.history
    a = load_file(str(whole.output / "adapter_model.safetensors"))
    b = load_file(str(resumed.output / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_checkpoint_is_an_error(tiny_llama: Path, pairs: Path, tmp_path: Path) -> None:
    with pytest.raises(ResumeError, match="nothing to resume"):
        train(config(tiny_llama, pairs, tmp_path / "none", resume=True))


def test_unknown_target_module_is_named(tiny_llama: Path, pairs: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"target modules not in .*: qkv_proj"):
        train(config(tiny_llama, pairs, tmp_path / "x", lora=LoraSpec(target_modules=("q_proj", "qkv_proj"))))
    with pytest.raises(ValueError, match=r"max length 300 exceeds the model's context \(256"):
        train(config(tiny_llama, pairs, tmp_path / "x", max_length=300))


def test_qlora_trains_adapters_on_a_frozen_int4_base(tiny_llama: Path, pairs: Path, tmp_path: Path) -> None:
    cfg = config(tiny_llama, pairs, tmp_path / "qlora", quantize="llmo-int4", checkpoint_every=4)
    tok = load_tokenizer(tiny_llama)
    before = perplexity(load_llama(tiny_llama), eval_set_of(cfg), tok.pad_id).perplexity
    result = train(cfg)
    assert result.model is not None
    base = result.model.get_base_model()
    int4 = [m for m in base.modules() if isinstance(m, Int4Linear)]
    assert len(int4) == 2 * 7
    assert all(m.qweight.dtype == torch.uint8 for m in int4)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert result.final_eval_perplexity is not None and result.final_eval_perplexity < 0.5 * before
    fp_bytes = sum(p.numel() * 4 for p in load_llama(tiny_llama).parameters())
    assert result.base_weight_bytes < fp_bytes

    # The same adapter file loads on the 4-bit base it trained on and on the fp base.
    ids = sample_ids(cfg)
    on_int4 = load_adapter(tiny_llama, cfg.output, quantize="llmo-int4")
    on_fp = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(tiny_llama)), str(cfg.output)).eval()
    with torch.no_grad():
        torch.testing.assert_close(on_int4(input_ids=ids).logits, result.model(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)
        assert torch.isfinite(on_fp(input_ids=ids).logits).all()


def test_qlora_on_bitsandbytes_nf4(tiny_llama: Path, pairs: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    cfg = config(tiny_llama, pairs, tmp_path / "nf4", quantize="bnb-nf4", epochs=1)
    result = train(cfg)
    assert result.model is not None
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in result.model.get_base_model().modules()) == 2 * 7
    assert all("lora_" in n for n, p in result.model.named_parameters() if p.requires_grad)
    first, last = result.history[0], result.history[-1]
    assert last["eval_perplexity"] < 1e3 and first["train_loss"] > 0
    assert (cfg.output / "adapter_model.safetensors").is_file()


def test_int4_linear_runs_the_project_kernel_and_back_propagates_through_the_dequantized_weight() -> None:
    import llmo.ops as ops

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48, bias=False)
    layer = Int4Linear.from_linear(linear, 64)
    weight = ops.dequantize_int4(layer.qweight, layer.scales, layer.qzeros, 64)
    x = torch.randn(3, 5, 128, requires_grad=True)
    out = layer(x)
    # Forward: exactly what the inference engine's INT4 path computes (the CPU kernel may
    # quantize activations per group), close to the fp product with the 4-bit weight.
    kernel = ops.int4_gemm(x.detach().reshape(15, 128), layer.qweight, layer.scales, layer.qzeros, 64)
    torch.testing.assert_close(out.detach().reshape(15, 48), kernel, rtol=0, atol=0)
    dense = x.detach() @ weight.t()
    assert float((out.detach() - dense).norm() / dense.norm()) < 0.05
    grad = torch.randn_like(out)
    out.backward(grad)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, grad @ weight, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("backend", ["llmo-int4", "bnb-nf4"])
def test_streaming_4bit_load_equals_quantizing_the_loaded_model(tiny_llama: Path, backend: str) -> None:
    from llmo.tune.quant4 import load_llama_4bit, quantize_projections

    streamed = load_llama_4bit(tiny_llama, backend).eval()
    in_place = load_llama(tiny_llama)
    assert quantize_projections(in_place, backend) == 2 * 7
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(streamed(input_ids=ids).logits, in_place.eval()(input_ids=ids).logits,
                                   rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in streamed.parameters())
