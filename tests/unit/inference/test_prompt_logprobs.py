"""Prompt logprobs: the engine's values equal log_softmax of an independent dense forward over the prompt."""

from __future__ import annotations

import pytest
import torch

from llmo.inference.engine.engine import EngineConfig, LLMEngine
from llmo.inference.engine.params import SamplingParams
from llmo.inference.engine.sequence import SequenceDelta, TokenLogprob
from llmo.inference.models.loader import LoadedModel, load_model
from tests.unit.inference.conftest import CheckpointFactory

PROMPT = "whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune. To be"
# fp32 paged (chunked) attention against the dense reference: the same tolerance as the model parity tests.
ATOL = 1e-4


@pytest.fixture(scope="module")
def loaded(make_checkpoint: CheckpointFactory) -> LoadedModel:
    return load_model(make_checkpoint("llama"))


def _engine(loaded: LoadedModel, **kw: int | bool) -> LLMEngine:
    config = {"num_blocks": 64, "block_size": 8, "max_num_batched_tokens": 64, "max_num_seqs": 16}
    config.update(kw)
    return LLMEngine(loaded, EngineConfig(**config))  # type: ignore[arg-type]


def _run(engine: LLMEngine) -> dict[str, list[SequenceDelta]]:
    out: dict[str, list[SequenceDelta]] = {}
    while engine.has_unfinished():
        for d in engine.step():
            out.setdefault(d.request_id, []).append(d)
    return out


def _reference(loaded: LoadedModel, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab] logprobs of the next token after each prompt prefix, from a dense forward."""
    with torch.inference_mode():
        logits = loaded.model.forward_dense(torch.tensor([prompt]))[0].float()
    return torch.log_softmax(logits, -1)[:-1]


def _check(got: list[TokenLogprob], prompt: list[int], reference: torch.Tensor, k: int) -> None:
    assert [lp.token_id for lp in got] == prompt[1:]
    expected = reference.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in got]), expected, atol=ATOL, rtol=0)
    values, ids = torch.topk(reference, k, dim=-1)
    for row, lp in enumerate(got):
        assert len(lp.top) == k
        torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), values[row], atol=ATOL, rtol=0)
        # Near-ties may swap places within the tolerance; the top token itself is well separated here.
        if k:
            assert lp.top[0][0] == int(ids[row, 0])


@pytest.mark.parametrize("budget", [64, 5], ids=["one-step-prefill", "chunked-prefill-5-tokens"])
def test_prompt_logprobs_match_a_dense_forward(loaded: LoadedModel, budget: int) -> None:
    prompt = loaded.tokenizer.encode(PROMPT)
    assert len(prompt) > 2 * budget or budget == 64
    engine = _engine(loaded, max_num_batched_tokens=budget)
    engine.add_request("p", prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                                   prompt_logprobs=3))
    deltas = _run(engine)["p"]
    assert deltas[0].prompt_logprobs is not None
    assert all(d.prompt_logprobs is None for d in deltas[1:])  # sent once, on the first delta
    _check(deltas[0].prompt_logprobs, prompt, _reference(loaded, prompt), 3)


def test_prompt_logprobs_recompute_a_cached_prefix_and_keep_the_output(loaded: LoadedModel) -> None:
    prompt = loaded.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine = _engine(loaded, max_num_batched_tokens=16)
    engine.add_request("warm", prompt, params)
    warm = _run(engine)["warm"]
    engine.add_request("cached", prompt, params)
    cached = _run(engine)["cached"]
    assert cached[-1].num_cached_tokens > 0  # the prompt's blocks are in the prefix cache

    engine.add_request("p", prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                   prompt_logprobs=2))
    deltas = _run(engine)["p"]
    assert deltas[-1].num_cached_tokens == 0  # recomputed rather than served from the cache
    assert deltas[0].prompt_logprobs is not None
    _check(deltas[0].prompt_logprobs, prompt, _reference(loaded, prompt), 2)
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == [t for d in warm for t in d.token_ids] == [t for d in cached for t in d.token_ids]


def test_prompt_logprobs_survive_preemption_mid_prefill(loaded: LoadedModel) -> None:
    prompt = loaded.tokenizer.encode(PROMPT)
    engine = _engine(loaded, max_num_batched_tokens=6, max_num_seqs=1)
    engine.add_request("low", prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True,
                                                     prompt_logprobs=1), priority=5)
    engine.step()
    engine.step()  # two chunks of the prompt are done
    engine.add_request("high", prompt[:5], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                       priority=0)
    out = _run(engine)
    assert engine.stats().num_preemptions == 1
    low = out["low"]
    assert low[0].prompt_logprobs is not None
    _check(low[0].prompt_logprobs, prompt, _reference(loaded, prompt), 1)


def test_max_tokens_zero_returns_only_prompt_logprobs(loaded: LoadedModel) -> None:
    prompt = loaded.tokenizer.encode(PROMPT)
    engine = _engine(loaded)
    engine.add_request("echo", prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))
    (delta,) = _run(engine)["echo"]
    assert delta.token_ids == [] and delta.finish_reason == "length" and delta.num_output_tokens == 0
    assert delta.prompt_logprobs is not None
    _check(delta.prompt_logprobs, prompt, _reference(loaded, prompt), 0)
    assert engine.blocks.num_free_blocks == engine.config.num_blocks


def test_one_token_prompt_has_no_prompt_logprobs_and_bad_values_are_rejected(loaded: LoadedModel) -> None:
    engine = _engine(loaded)
    engine.add_request("one", [5], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=4))
    deltas = _run(engine)["one"]
    assert deltas[0].prompt_logprobs == []
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21).validate()
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0).validate()
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0, prompt_logprobs=1, n=2).validate()


def test_prompt_logprobs_of_several_requests_in_one_mixed_batch(loaded: LoadedModel) -> None:
    # Prefill chunks of two prompts that want logprobs share steps with a decoding request and an n = 2 fork.
    prompts = [loaded.tokenizer.encode(PROMPT), loaded.tokenizer.encode("Café naïve 日本語 and the question")]
    engine = _engine(loaded, max_num_batched_tokens=12)
    engine.add_request("busy", prompts[1][:4], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    engine.step()
    engine.add_request("a", prompts[0], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True,
                                                       prompt_logprobs=2))
    engine.add_request("b", prompts[1], SamplingParams(max_tokens=3, temperature=1.0, seed=3, n=2,
                                                       ignore_eos=True, prompt_logprobs=1))
    out = _run(engine)
    for rid, prompt, k in (("a", prompts[0], 2), ("b", prompts[1], 1)):
        with_prompt = [d for d in out[rid] if d.prompt_logprobs is not None]
        assert len(with_prompt) == 1 and with_prompt[0] is out[rid][0]
        _check(with_prompt[0].prompt_logprobs or [], prompt, _reference(loaded, prompt), k)
    assert sorted({d.index for d in out["b"]}) == [0, 1]
    assert all(d.prompt_logprobs is None for d in out["busy"])
