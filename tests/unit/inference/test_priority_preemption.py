"""A waiting request of higher priority (lower value) preempts lower-priority running requests."""

from __future__ import annotations

import pytest

from llmo.inference.engine.engine import EngineConfig, LLMEngine
from llmo.inference.engine.params import SamplingParams
from llmo.inference.models.loader import LoadedModel, load_model
from tests.unit.inference.conftest import CheckpointFactory

TEXT = ("whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune. "
        "To be, or not to be, that is the question: whether")
LOW = SamplingParams(max_tokens=28, temperature=0, ignore_eos=True)
HIGH = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(make_checkpoint: CheckpointFactory) -> LoadedModel:
    return load_model(make_checkpoint("llama"))


@pytest.fixture(scope="module")
def prompts(loaded: LoadedModel) -> list[list[int]]:
    ids = loaded.tokenizer.encode(TEXT)
    assert len(ids) >= 26
    return [ids[:20], ids[3:23], ids[6:26]]


def _engine(loaded: LoadedModel, **kw: int | bool) -> LLMEngine:
    config = {"num_blocks": 64, "block_size": 8, "max_num_batched_tokens": 64, "max_num_seqs": 16,
              "enable_prefix_caching": False}
    config.update(kw)
    return LLMEngine(loaded, EngineConfig(**config))  # type: ignore[arg-type]


def _alone(loaded: LoadedModel, prompt: list[int], params: SamplingParams) -> list[int]:
    return _engine(loaded).generate([prompt], params)[0]


def _contend(engine: LLMEngine, prompts: list[list[int]], high_priority: int,
             full: str) -> tuple[list[str], dict[str, list[int]]]:
    """Fill the engine with two low-priority requests, then add one more; returns the event order and outputs."""
    engine.add_request("low-0", prompts[0], LOW, priority=5)
    engine.add_request("low-1", prompts[1], LOW, priority=5)
    out: dict[str, list[int]] = {}
    events: list[str] = []

    def step() -> None:
        for d in engine.step():
            if not out.get(d.request_id) and d.token_ids:
                events.append(f"first:{d.request_id}")
            out.setdefault(d.request_id, []).extend(d.token_ids)
            if d.finish_reason:
                events.append(f"finish:{d.request_id}")

    while not ((full == "seqs" and len(engine.scheduler.running) == 2 and out)
               or (full == "blocks" and engine.blocks.num_free_blocks == 0)):
        step()
    assert not any(e.startswith("finish") for e in events)
    engine.add_request("high", prompts[2], HIGH, priority=high_priority)
    while engine.has_unfinished():
        step()
    return events, out


@pytest.mark.parametrize("full", ["seqs", "blocks"])
def test_high_priority_request_preempts_low_priority_ones_and_outputs_stay_identical(
        loaded: LoadedModel, prompts: list[list[int]], full: str) -> None:
    # Either two sequence slots, or exactly the KV blocks the two low-priority requests need to finish.
    if full == "seqs":
        engine = _engine(loaded, max_num_seqs=2)
    else:
        engine = _engine(loaded, num_blocks=2 * engine_blocks(loaded, prompts[0], LOW))
    events, out = _contend(engine, prompts, high_priority=0, full=full)
    assert events.index("first:high") < events.index("finish:low-0")
    assert events.index("first:high") < events.index("finish:low-1")
    assert engine.stats().num_preemptions >= 1
    assert out["low-0"] == _alone(loaded, prompts[0], LOW)
    assert out["low-1"] == _alone(loaded, prompts[1], LOW)
    assert out["high"] == _alone(loaded, prompts[2], HIGH)
    assert engine.blocks.num_free_blocks == engine.config.num_blocks


def engine_blocks(loaded: LoadedModel, prompt: list[int], params: SamplingParams) -> int:
    # The last sampled token's KV is never computed.
    return -(-(len(prompt) + params.max_tokens - 1) // 8)


@pytest.mark.parametrize("priority", [5, 9])
def test_equal_or_lower_priority_never_preempts(loaded: LoadedModel, prompts: list[list[int]],
                                                priority: int) -> None:
    engine = _engine(loaded, max_num_seqs=2)
    events, out = _contend(engine, prompts, high_priority=priority, full="seqs")
    assert engine.stats().num_preemptions == 0
    assert events.index("first:high") > events.index("finish:low-0")
    assert out["high"] == _alone(loaded, prompts[2], HIGH)


def test_no_preemption_when_it_cannot_make_room(loaded: LoadedModel, prompts: list[list[int]]) -> None:
    # Preempting the only lower-priority request would still leave too few blocks for the urgent request's
    # first chunk (the other running request has its priority): nobody is preempted, no work is wasted.
    engine = _engine(loaded, num_blocks=6)
    engine.add_request("mid", prompts[0][:16], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                       priority=0)
    engine.add_request("low", prompts[1][:8], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                       priority=5)
    engine.step()
    engine.step()
    assert engine.blocks.num_free_blocks == 1
    assert len(engine.scheduler.running[-1].block_ids) == 2  # "low": freeing it gives 3 blocks
    urgent = (prompts[2] * 2)[:32]  # a 4-block first chunk
    engine.add_request("urgent", urgent, SamplingParams(max_tokens=1, temperature=0), priority=0)
    engine.step()
    assert engine.stats().num_preemptions == 0
    assert [s.request.request_id for s in engine.scheduler.waiting] == ["urgent"]
