from __future__ import annotations

from pathlib import Path

import pytest

from llmo.router.learned.embed import model_path
from llmo.router.lingua import SurprisalPruner


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny randomly initialised Llama with a real tokenizer, saved as a local HF directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-lm")
    tok = AutoTokenizer.from_pretrained(str(model_path()))
    config = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_pruning_keeps_the_most_surprising_tokens_in_order(tiny_lm: Path) -> None:
    pruner = SurprisalPruner(tiny_lm, max_tokens=16)
    text = "the quick brown fox jumps over a lazy dog while one cat sleeps on my warm mat near your door"
    ids, scores = pruner.surprisal(text)
    assert len(scores) == len(ids) and scores[0] == float("inf")
    assert all(s >= 0 for s in scores[1:])
    res = pruner.prune(text, keep_ratio=0.5)
    assert res.tokens_before == len(ids)
    assert res.tokens_after == round(len(ids) * 0.5) and res.tokens_saved > 0
    kept_words = res.text.split()
    assert kept_words[0] == "the"  # the first token is always kept
    positions = [text.split().index(w) for w in kept_words if w in text.split()]
    assert positions == sorted(positions)  # original order
    assert pruner.prune(text, 1.0).text == text
    with pytest.raises(ValueError):
        pruner.prune(text, 0.0)


async def test_gateway_prunes_history_tokens_and_reports_savings(tiny_lm: Path, engine, backend) -> None:  # type: ignore[no-untyped-def]
    from llmo.core.errors import ServiceError
    from llmo.router.context import Message
    from llmo.router.gateway import GatewayRequest

    from .gw_helpers import collect, load, make_gateway, portfolio_yaml

    history = "the quick brown fox jumps over a lazy dog while one cat sleeps on my warm mat near your door " * 3
    req = GatewayRequest(
        tenant="t",
        messages=[Message("system", "be brief"), Message("user", history), Message("user", "summarise that")],
        model="small",
        token_keep_ratio=0.4,
    )
    gw = make_gateway(engine, load(portfolio_yaml(backend.base_url)), pruner=SurprisalPruner(tiny_lm))
    started, _, fin = await collect(gw, req)
    assert started.tokens_saved > 0 and fin.finish_reason == "stop"
    sent = backend.requests[-1]["messages"]
    assert sent[0]["content"] == "be brief" and sent[-1]["content"] == "summarise that"
    assert len(sent[1]["content"]) < len(history)
    await gw.close()
    bare = make_gateway(engine, load(portfolio_yaml(backend.base_url)))
    with pytest.raises(ServiceError) as err:
        await bare.prepare(req)
    assert err.value.reason == "COMPRESSION_MODEL_UNCONFIGURED"
    with pytest.raises(ServiceError) as err:
        await gw.prepare(GatewayRequest(tenant="t", messages=req.messages, token_keep_ratio=1.5))
    assert err.value.reason == "INVALID_KEEP_RATIO"
