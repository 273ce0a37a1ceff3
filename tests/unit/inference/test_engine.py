"""The native engine: batching invariance, prefix caching, preemption, priorities, sampling, stops."""

from __future__ import annotations

import pytest

from llmo.inference.engine.engine import ContextLengthError, EngineConfig, LLMEngine, QueueFullError
from llmo.inference.engine.params import SamplingParams
from llmo.inference.engine.sequence import SequenceDelta
from llmo.inference.models.loader import LoadedModel, load_model
from tests.unit.inference.conftest import CheckpointFactory

TEXTS = [
    "To be, or not to be, that is the question",
    "whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune",
    "Café naïve",
    "the question: whether",
    "emoji 🙂 ünïcödé and the mind",
]


@pytest.fixture(scope="module")
def loaded(make_checkpoint: CheckpointFactory) -> LoadedModel:
    return load_model(make_checkpoint("llama"))


def _engine(loaded: LoadedModel, **kw: int | bool) -> LLMEngine:
    config = {"num_blocks": 64, "block_size": 8, "max_num_batched_tokens": 32, "max_num_seqs": 16}
    config.update(kw)
    return LLMEngine(loaded, EngineConfig(**config))  # type: ignore[arg-type]


def _run(engine: LLMEngine) -> dict[tuple[str, int], list[SequenceDelta]]:
    out: dict[tuple[str, int], list[SequenceDelta]] = {}
    while engine.has_unfinished():
        for d in engine.step():
            out.setdefault((d.request_id, d.index), []).append(d)
    return out


def _tokens(deltas: list[SequenceDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def _text(deltas: list[SequenceDelta]) -> str:
    return "".join(d.text for d in deltas)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=11, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_request_alone_and_inside_busy_batch_give_identical_output(loaded: LoadedModel,
                                                                   params: SamplingParams) -> None:
    target = loaded.tokenizer.encode(TEXTS[1])
    alone = _engine(loaded)
    alone.add_request("target", target, params)
    expected = _run(alone)[("target", 0)]

    busy = _engine(loaded, max_num_batched_tokens=12)
    for i, text in enumerate(TEXTS):
        busy.add_request(f"other-{i}", loaded.tokenizer.encode(text), SamplingParams(
            max_tokens=10 + 3 * i, temperature=1.0, seed=i, ignore_eos=True))
    out: dict[tuple[str, int], list[SequenceDelta]] = {}
    for _ in range(3):  # join while the others are mid-prefill / decoding
        for d in busy.step():
            out.setdefault((d.request_id, d.index), []).append(d)
    busy.add_request("target", target, params)
    for key, deltas in _run(busy).items():
        out.setdefault(key, []).extend(deltas)
    assert _tokens(out[("target", 0)]) == _tokens(expected)
    assert _text(out[("target", 0)]) == _text(expected)


def test_prefix_cache_hits_do_not_change_outputs(loaded: LoadedModel) -> None:
    prompt = loaded.tokenizer.encode(TEXTS[1] + " " + TEXTS[0])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    uncached = _engine(loaded, enable_prefix_caching=False)
    uncached.add_request("a", prompt, params)
    expected = _tokens(_run(uncached)[("a", 0)])

    engine = _engine(loaded)
    engine.add_request("first", prompt, params)
    first = _run(engine)[("first", 0)]
    engine.add_request("second", prompt, params)
    second = _run(engine)[("second", 0)]
    assert first[-1].num_cached_tokens == 0
    assert second[-1].num_cached_tokens >= len(prompt) - engine.config.block_size
    assert engine.stats().prefix_hit_rate > 0
    assert _tokens(first) == _tokens(second) == expected


def test_preemption_by_recompute_keeps_outputs(loaded: LoadedModel) -> None:
    prompts = [loaded.tokenizer.encode(t) for t in TEXTS[:4]]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    roomy = _engine(loaded)
    expected = roomy.generate(prompts, params)
    # 7 blocks of 8 tokens cannot hold four sequences of ~30-45 tokens at once.
    tight = _engine(loaded, num_blocks=7, enable_prefix_caching=False)
    got = tight.generate(prompts, params)
    assert tight.stats().num_preemptions > 0
    assert got == expected
    assert tight.blocks.num_free_blocks == 7


def test_priority_orders_admission(loaded: LoadedModel) -> None:
    engine = _engine(loaded, max_num_seqs=1)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    engine.add_request("low", loaded.tokenizer.encode(TEXTS[0]), params, priority=5)
    engine.add_request("high", loaded.tokenizer.encode(TEXTS[2]), params, priority=-1)
    finished = [d.request_id for d in (d for _ in range(40) for d in engine.step()) if d.finish_reason]
    assert finished == ["high", "low"]


def test_n_samples_share_prompt_blocks_and_match_seeded_singles(loaded: LoadedModel) -> None:
    prompt = loaded.tokenizer.encode(TEXTS[1])
    engine = _engine(loaded)
    engine.add_request("multi", prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=3,
                                                       ignore_eos=True))
    out: dict[tuple[str, int], list[SequenceDelta]] = {}
    shared_refs = 0
    while engine.has_unfinished():
        for d in engine.step():
            out.setdefault((d.request_id, d.index), []).append(d)
        seqs = engine.scheduler.running
        if len(seqs) == 3:
            shared_refs = max(shared_refs, engine.blocks.ref_counts[seqs[0].block_ids[0]])
    assert shared_refs == 3
    assert sorted(i for _, i in out) == [0, 1, 2]
    for i in range(3):
        single = _engine(loaded)
        single.add_request("s", prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=7 + i, ignore_eos=True))
        assert _tokens(_run(single)[("s", 0)]) == _tokens(out[("multi", i)])
    assert engine.blocks.num_free_blocks == engine.config.num_blocks


def test_stop_string_cuts_text_and_is_never_streamed(loaded: LoadedModel) -> None:
    prompt = loaded.tokenizer.encode(TEXTS[0])
    engine = _engine(loaded)
    engine.add_request("free", prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    full = _text(_run(engine)[("free", 0)])
    assert len(full) > 12
    stop = full[8:11]
    cut = full[: full.find(stop)]
    engine.add_request("stopped", prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                         stop=[stop]))
    deltas = _run(engine)[("stopped", 0)]
    assert _text(deltas) == cut
    assert deltas[-1].finish_reason == "stop"
    streamed = ""
    for d in deltas:
        streamed += d.text
        assert stop not in streamed


def test_stop_token_ids_max_tokens_and_logprobs(loaded: LoadedModel) -> None:
    prompt = loaded.tokenizer.encode(TEXTS[3])
    engine = _engine(loaded)
    engine.add_request("free", prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3))
    deltas = _run(engine)[("free", 0)]
    tokens = _tokens(deltas)
    assert len(tokens) == 6 and deltas[-1].finish_reason == "length"
    for d in deltas:
        (lp,) = d.logprobs
        assert lp.token_id == d.token_ids[0] == lp.top[0][0]
        assert len(lp.top) == 3 and lp.logprob <= 0
    engine.add_request("stop-id", prompt, SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[tokens[2]],
                                                         ignore_eos=True))
    stopped = _run(engine)[("stop-id", 0)]
    assert _tokens(stopped) == tokens[:3] and stopped[-1].finish_reason == "stop"


def test_abort_frees_kv_blocks_at_once(loaded: LoadedModel) -> None:
    engine = _engine(loaded)
    engine.add_request("x", loaded.tokenizer.encode(TEXTS[1]), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.blocks.num_free_blocks < engine.config.num_blocks
    assert engine.abort("x")
    assert engine.blocks.num_free_blocks == engine.config.num_blocks
    assert not engine.has_unfinished()
    assert not engine.abort("x")


def test_context_length_queue_limit_and_bad_input(loaded: LoadedModel) -> None:
    engine = _engine(loaded, max_queue=2)
    prompt = loaded.tokenizer.encode(TEXTS[0])
    with pytest.raises(ContextLengthError, match="context length of 256") as info:
        engine.add_request("long", prompt, SamplingParams(max_tokens=250))
    assert info.value.limit == 256
    engine.add_request("a", prompt, SamplingParams())
    engine.add_request("b", prompt, SamplingParams())
    with pytest.raises(QueueFullError):
        engine.add_request("c", prompt, SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request("d", prompt, SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("e", [10_000], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", prompt, SamplingParams())


def test_engine_failures_are_internal_errors_not_bad_input() -> None:
    import grpc

    from llmo.inference.backends.native import to_service_error
    from llmo.inference.engine.engine import ContextLengthError

    assert to_service_error(RuntimeError("engine step failed: boom")).code == grpc.StatusCode.INTERNAL
    assert to_service_error(RuntimeError("engine step failed: boom")).reason == "ENGINE_ERROR"
    err = to_service_error(ContextLengthError("too long", 512, 600))
    assert (err.reason, err.metadata["limit"]) == ("CONTEXT_LENGTH_EXCEEDED", "512")
    assert to_service_error(QueueFullError(3)).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    from llmo.inference.engine.params import SamplingError

    assert to_service_error(SamplingError("top_p", "top_p must be in (0, 1], got 2")).metadata["field"] == "top_p"
    # An engine message never becomes a `field` by guessing (it used to give "at" or "Overflow").
    assert "field" not in to_service_error(ValueError("at most 16 stop strings")).metadata


def test_without_chunked_prefill_whole_prompts_run_and_must_fit_the_budget(loaded: LoadedModel) -> None:
    prompt = loaded.tokenizer.encode(TEXTS[0])
    assert len(prompt) > 8
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    whole = _engine(loaded, enable_chunked_prefill=False, max_num_batched_tokens=len(prompt) + 6)
    chunked = _engine(loaded, max_num_batched_tokens=4)
    assert whole.generate([prompt], params) == chunked.generate([prompt], params)
    with pytest.raises(ContextLengthError, match="chunked prefill is off"):
        whole.add_request("big", prompt, SamplingParams(max_tokens=7))
