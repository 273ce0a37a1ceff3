"""LoRA adapters served by the native engine: PEFT files read and checked, outputs equal to the merged
weights, base and several adapters in one batch, prefix-cache isolation, hot unload."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from llmo.inference.engine.adapters import AdapterRegistry
from llmo.inference.engine.engine import EngineConfig, LLMEngine
from llmo.inference.engine.params import SamplingParams
from llmo.inference.models.loader import LoadedModel, load_model
from llmo.inference.models.lora import AdapterError, AdapterSlots, projection_shapes, read_adapter
from tests.unit.inference.conftest import CheckpointFactory

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 17, 33, 2, 41, 9, 77, 12, 3, 8, 19, 23, 57, 60, 61, 62, 63, 64, 90], [100, 3, 7], [250, 251, 9, 9, 4]]


def write_adapter(out: Path, loaded: LoadedModel, *, rank: int = 4, alpha: float = 8.0, seed: int = 1,
                  targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"), std: float = 0.3,
                  config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """A PEFT-format adapter directory with random A and B; returns its tensors."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = projection_shapes(loaded.config)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(loaded.config.num_layers):
        for module in targets:
            fan_in, fan_out = shapes[module]
            part = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * std
    save_file(tensors, str(out / "adapter_model.safetensors"))
    body = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
            "bias": "none", "task_type": "CAUSAL_LM"}
    body.update(config or {})
    (out / "adapter_config.json").write_text(json.dumps(body))
    return tensors


def merged_model(path: Path, tensors: dict[str, torch.Tensor], scaling: float) -> LoadedModel:
    """The base checkpoint with W + scaling * B @ A folded in: what an adapter's outputs must equal."""
    loaded = load_model(path)
    params = dict(loaded.model.named_parameters())
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            params[name] += scaling * (b @ a)
    return loaded


def adapter_engine(path: Path, slots: int = 4, rank: int = 8, **config: Any) -> LLMEngine:
    loaded = load_model(path)
    registry = AdapterRegistry(AdapterSlots(loaded.model, loaded.config, slots, rank, loaded.dtype), "base")
    return LLMEngine(loaded, EngineConfig(num_blocks=64, block_size=8, **config), adapters=registry)


def load(engine: LLMEngine, name: str, directory: Path) -> None:
    assert engine.adapters is not None
    engine.adapters.load(name, read_adapter(directory, engine.loaded.config, max_rank=engine.adapters.slots.rank),
                         str(directory))


def run(engine: LLMEngine, jobs: list[tuple[list[int], str | None]]) -> list[list[int]]:
    """All jobs in the engine at once (so they share steps); output ids per job."""
    out: dict[str, list[int]] = {}
    for i, (prompt, adapter) in enumerate(jobs):
        engine.add_request(f"r{i}", prompt, GREEDY, adapter=adapter)
    while engine.has_unfinished():
        for delta in engine.step():
            out.setdefault(delta.request_id, []).extend(delta.token_ids)
    return [out[f"r{i}"] for i in range(len(jobs))]


@pytest.fixture
def checkpoint(make_checkpoint: CheckpointFactory) -> Path:
    return make_checkpoint()


def test_adapter_outputs_equal_the_merged_weights_and_mix_in_one_batch(checkpoint: Path, tmp_path: Path) -> None:
    engine = adapter_engine(checkpoint)
    t1 = write_adapter(tmp_path / "a1", engine.loaded, rank=4, alpha=8.0, seed=1)
    t2 = write_adapter(tmp_path / "a2", engine.loaded, rank=8, alpha=4.0, seed=2,
                       targets=("k_proj", "o_proj", "gate_proj", "up_proj"))
    load(engine, "a1", tmp_path / "a1")
    load(engine, "a2", tmp_path / "a2")

    base_engine = LLMEngine(load_model(checkpoint), EngineConfig(num_blocks=64, block_size=8))
    want_base = run(base_engine, [(p, None) for p in PROMPTS])
    want_a1 = run(LLMEngine(merged_model(checkpoint, t1, 8.0 / 4), EngineConfig(num_blocks=64, block_size=8)),
                  [(p, None) for p in PROMPTS])
    want_a2 = run(LLMEngine(merged_model(checkpoint, t2, 4.0 / 8), EngineConfig(num_blocks=64, block_size=8)),
                  [(p, None) for p in PROMPTS])
    assert want_a1 != want_base and want_a2 != want_base  # the adapters change the outputs

    # every prompt under the base and both adapters, all in the same steps
    jobs = [(p, name) for name in (None, "a1", "a2") for p in PROMPTS]
    got = run(engine, jobs)
    assert got == want_base + want_a1 + want_a2


def test_prefix_cache_never_reuses_blocks_across_adapters(checkpoint: Path, tmp_path: Path) -> None:
    engine = adapter_engine(checkpoint)
    tensors = write_adapter(tmp_path / "a1", engine.loaded, seed=3)
    load(engine, "a1", tmp_path / "a1")
    prompt = PROMPTS[0]  # two full blocks of 8: cached after the first request
    (base_first,) = run(engine, [(prompt, None)])
    (adapted,) = run(engine, [(prompt, "a1")])
    (base_again,) = run(engine, [(prompt, None)])
    merged = LLMEngine(merged_model(checkpoint, tensors, 8.0 / 4), EngineConfig(num_blocks=64, block_size=8))
    assert adapted == run(merged, [(prompt, None)])[0]
    assert base_again == base_first
    assert engine.blocks.prefix_hits > 0  # the base's second run did reuse its own blocks


def test_unload_lets_running_requests_finish_then_frees_the_slot(checkpoint: Path, tmp_path: Path) -> None:
    engine = adapter_engine(checkpoint, slots=1)
    write_adapter(tmp_path / "a1", engine.loaded)
    load(engine, "a1", tmp_path / "a1")
    registry = engine.adapters
    assert registry is not None
    engine.add_request("running", PROMPTS[1], GREEDY, adapter="a1")
    tokens = [t for delta in engine.step() for t in delta.token_ids]
    handle = registry.unload("a1")
    assert registry.names() == [] and handle.users == 1
    with pytest.raises(AdapterError) as missing:
        engine.add_request("late", PROMPTS[1], GREEDY, adapter="a1")
    assert missing.value.reason == "ADAPTER_NOT_FOUND"
    with pytest.raises(AdapterError) as full:  # the slot is still held by the running request
        load(engine, "a2", tmp_path / "a1")
    assert full.value.reason == "ADAPTER_LIMIT"
    while engine.has_unfinished():
        for delta in engine.step():
            tokens += delta.token_ids
    assert len(tokens) == GREEDY.max_tokens and handle.users == 0
    assert not any(module.loaded[0] for module in registry.slots.modules.values())  # cleared
    load(engine, "a2", tmp_path / "a1")
    assert registry.names() == ["a2"]


def test_abort_releases_the_adapter(checkpoint: Path, tmp_path: Path) -> None:
    engine = adapter_engine(checkpoint)
    write_adapter(tmp_path / "a1", engine.loaded)
    load(engine, "a1", tmp_path / "a1")
    assert engine.adapters is not None
    engine.add_request("r", PROMPTS[0], GREEDY, adapter="a1")
    engine.step()
    handle = engine.adapters.get("a1")
    assert handle is not None and handle.users == 1
    engine.abort("r")
    assert handle.users == 0


def _expect(reason: str, directory: Path, loaded: LoadedModel, max_rank: int = 8) -> str:
    with pytest.raises(AdapterError) as info:
        read_adapter(directory, loaded.config, max_rank=max_rank)
    assert info.value.reason == reason, str(info.value)
    return str(info.value)


def test_adapters_that_do_not_fit_are_refused_with_reasons(checkpoint: Path, tmp_path: Path) -> None:
    loaded = load_model(checkpoint)
    assert "not a directory" in _expect("ADAPTER_INVALID", tmp_path / "missing", loaded)
    (tmp_path / "empty").mkdir()
    assert "adapter_config.json" in _expect("ADAPTER_INVALID", tmp_path / "empty", loaded)

    write_adapter(tmp_path / "big", loaded, rank=16)
    assert "rank limit 8" in _expect("ADAPTER_INCOMPATIBLE", tmp_path / "big", loaded)
    write_adapter(tmp_path / "dora", loaded, config={"use_dora": True})
    assert "DoRA" in _expect("ADAPTER_UNSUPPORTED", tmp_path / "dora", loaded)
    write_adapter(tmp_path / "saved", loaded, config={"modules_to_save": ["lm_head"]})
    _expect("ADAPTER_UNSUPPORTED", tmp_path / "saved", loaded)
    write_adapter(tmp_path / "bias", loaded, config={"bias": "lora_only"})
    _expect("ADAPTER_UNSUPPORTED", tmp_path / "bias", loaded)

    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "adapter_config.json").write_text("{not json")
    assert "not valid JSON" in _expect("ADAPTER_INVALID", tmp_path / "badjson", loaded)

    tensors = write_adapter(tmp_path / "corrupt", loaded)
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage")
    assert "safetensors" in _expect("ADAPTER_INVALID", tmp_path / "corrupt", loaded)

    # a wider model's adapter on this base
    wide = {k: torch.zeros(v.shape[0] * 2 if ".lora_B." in k else v.shape[0], *v.shape[1:]) for k, v in tensors.items()}
    save_file(wide, str(tmp_path / "corrupt" / "adapter_model.safetensors"))
    assert "do not fit the base" in _expect("ADAPTER_INCOMPATIBLE", tmp_path / "corrupt", loaded)

    lm_head = dict(tensors)
    lm_head["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, loaded.config.hidden_size)
    save_file(lm_head, str(tmp_path / "corrupt" / "adapter_model.safetensors"))
    assert "cannot serve" in _expect("ADAPTER_INCOMPATIBLE", tmp_path / "corrupt", loaded)

    half = {k: v for k, v in tensors.items() if ".lora_B." not in k}
    save_file(half, str(tmp_path / "corrupt" / "adapter_model.safetensors"))
    assert "not both" in _expect("ADAPTER_INVALID", tmp_path / "corrupt", loaded)

    nan = dict(tensors)
    first = next(iter(nan))
    nan[first] = nan[first].clone().fill_(float("nan"))
    save_file(nan, str(tmp_path / "corrupt" / "adapter_model.safetensors"))
    assert "NaN" in _expect("ADAPTER_INVALID", tmp_path / "corrupt", loaded)

    (tmp_path / "corrupt" / "adapter_model.safetensors").unlink()
    (tmp_path / "corrupt" / "adapter_model.bin").write_bytes(b"pickle")
    assert "only safetensors" in _expect("ADAPTER_INVALID", tmp_path / "corrupt", loaded)


def test_rslora_scaling_and_registry_names(checkpoint: Path, tmp_path: Path) -> None:
    loaded = load_model(checkpoint)
    write_adapter(tmp_path / "rs", loaded, rank=4, alpha=8.0, config={"use_rslora": True})
    assert read_adapter(tmp_path / "rs", loaded.config, max_rank=8).scaling == pytest.approx(8.0 / 2.0)
    engine = adapter_engine(checkpoint)
    assert engine.adapters is not None
    for bad in ("", "base", "a b", "x" * 200, "../up"):
        with pytest.raises(AdapterError) as info:
            load(engine, bad, tmp_path / "rs")
        assert info.value.reason == "INVALID_ADAPTER_NAME"
    load(engine, "rs", tmp_path / "rs")
    with pytest.raises(AdapterError) as twice:
        load(engine, "rs", tmp_path / "rs")
    assert twice.value.reason == "ADAPTER_EXISTS"


def test_slot_memory_estimate_matches_the_buffers(checkpoint: Path) -> None:
    loaded = load_model(checkpoint)
    slots = AdapterSlots(loaded.model, loaded.config, 3, 8, loaded.dtype)
    held = sum(m.lora_a.numel() * m.lora_a.element_size() + m.lora_b.numel() * m.lora_b.element_size()
               for m in slots.modules.values())
    assert AdapterSlots.bytes_needed(loaded.config, 3, 8, loaded.dtype) == held
