from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine

from llmo.core.errors import ServiceError
from llmo.router.cache import CachedAnswer, SemanticCache
from llmo.router.context import Message, compress_text, prune_history
from llmo.router.learned.embed import Embedder
from llmo.router.prompts import PromptRegistry, render_template, template_variables
from llmo.router.tokens import count_tokens

ANSWER = CachedAnswer("Paris.", "small", 10, 2, "stop")


def test_pruning_keeps_system_and_latest_and_prefers_relevant_turns(embedder: Embedder) -> None:
    filler = "We talked about the weather and the rain and the clouds for a long while. " * 4
    msgs = [
        Message("system", "You are a helpful assistant."),
        Message("user", "My dog Rex is a golden retriever who loves swimming in the lake."),
        Message("assistant", "Rex sounds lovely!"),
        Message("user", filler),
        Message("assistant", filler),
        Message("user", "What breed is my dog Rex?"),
    ]
    total = sum(count_tokens(m.content) + 4 for m in msgs)
    res = prune_history(msgs, budget_tokens=total // 2, encoder=embedder.encode)
    kept = [m.content for m in res.messages]
    assert kept[0] == "You are a helpful assistant." and kept[-1] == "What breed is my dog Rex?"
    assert msgs[1].content in kept  # the relevant old turn survives
    assert filler not in kept
    assert res.tokens_after <= total // 2 and res.tokens_saved > 0
    assert res.tokens_before == total
    unchanged = prune_history(msgs, budget_tokens=10 * total)
    assert unchanged.messages == msgs and unchanged.tokens_saved == 0


def test_pruning_reports_when_even_pinned_messages_do_not_fit() -> None:
    res = prune_history([Message("system", "x " * 50), Message("user", "y " * 50)], budget_tokens=10)
    assert res.over_budget and len(res.messages) == 2


def test_extractive_compression_keeps_relevant_sentences(embedder: Embedder) -> None:
    text = (
        "The Eiffel Tower is in Paris. It was completed in 1889. "
        "Bananas are rich in potassium. Many people enjoy jazz music on weekends. "
        "The tower is 330 metres tall. Cats sleep for most of the day."
    )
    res = compress_text(text, budget_tokens=20, query="How tall is the Eiffel Tower?", encoder=embedder.encode)
    assert "330 metres" in res.text
    assert "Bananas" not in res.text
    assert res.tokens_after <= 20 < res.tokens_before
    assert res.tokens_saved == res.tokens_before - res.tokens_after
    with pytest.raises(ValueError):
        compress_text(text, 0)


def test_cache_exact_semantic_ttl_and_tenant_isolation(embedder: Embedder) -> None:
    now = [0.0]
    cache = SemanticCache(embedder.encode, ttl_s=60, similarity_threshold=0.95, clock=lambda: now[0])
    q = [("user", "What is the capital city of France?")]
    cache.store("tenant-a", "auto", q, ANSWER)
    hit = cache.lookup("tenant-a", "auto", q)
    assert hit is not None and hit.kind == "exact"
    near = cache.lookup("tenant-a", "auto", [("user", "what is the capital city of france?")])
    assert near is not None and near.kind == "semantic" and near.answer == ANSWER
    assert cache.lookup("tenant-a", "auto", [("user", "What is the capital city of Spain?")]) is None
    # Never across tenants, even for the identical prompt.
    assert cache.lookup("tenant-b", "auto", q) is None
    # Different scope (model / parameters) or conversation context: no hit.
    assert cache.lookup("tenant-a", "other-model", q) is None
    assert cache.lookup("tenant-a", "auto", [("user", "hello"), *q]) is None
    now[0] = 61
    assert cache.lookup("tenant-a", "auto", q) is None
    assert cache.size("tenant-a") == 0


def test_cache_evicts_least_recently_used() -> None:
    cache = SemanticCache(None, max_entries_per_tenant=2)
    for i in range(3):
        cache.store("t", "s", [("user", f"q{i}")], ANSWER)
    assert cache.lookup("t", "s", [("user", "q0")]) is None
    assert cache.lookup("t", "s", [("user", "q2")]) is not None


def test_template_variables_and_render_validation() -> None:
    assert template_variables("Hi {{ name }}, {{name}} from {{org}}") == ["name", "org"]
    with pytest.raises(ValueError):
        template_variables("broken {{ name")
    assert render_template("Hi {{name}}", {"name": "Ada"}) == "Hi Ada"
    with pytest.raises(ServiceError) as err:
        render_template("Hi {{name}}", {})
    assert err.value.reason == "MISSING_VARIABLE"
    with pytest.raises(ServiceError) as err:
        render_template("Hi {{name}}", {"name": "a", "extra": "b"})
    assert err.value.reason == "UNKNOWN_VARIABLE"


def test_registry_versions_are_immutable_and_labels_move(engine: Engine) -> None:
    reg = PromptRegistry(engine)
    reg.create_template("t1", "sum", "")
    v1 = reg.create_version("t1", "sum", "Summarise: {{text}}", ["production"])
    v2 = reg.create_version("t1", "sum", "Summarise briefly: {{text}}", [])
    assert (v1.version, v2.version) == (1, 2)
    assert reg.resolve("t1", "sum").version == 1  # production label
    reg.set_label("t1", "sum", "production", 2)
    assert reg.resolve("t1", "sum").version == 2
    assert reg.get_version("t1", "sum", 1).body == "Summarise: {{text}}"
    with pytest.raises(ServiceError) as err:
        reg.create_template("t1", "sum", "")
    assert err.value.reason == "PROMPT_EXISTS"
    with pytest.raises(ServiceError) as err:
        reg.create_template("t1", "Bad Name", "")
    assert err.value.reason == "INVALID_ID"
    with pytest.raises(ServiceError) as err:
        reg.resolve("t2", "sum")
    assert err.value.reason == "PROMPT_NOT_FOUND"
    with pytest.raises(ServiceError) as err:
        reg.resolve("t1", "sum", label="canary")
    assert err.value.reason == "LABEL_NOT_FOUND"
    rows, total = reg.audit("t1", 0, 10)
    assert [r[0].version for r in rows] == [2, 1] and total == v1.token_count + v2.token_count


def test_exact_entry_first_then_embedding(embedder: Embedder) -> None:
    cache = SemanticCache(embedder.encode)
    q = [("user", "What is the capital city of France?")]
    cache.store("t", "auto", q, ANSWER, embed=False)
    assert cache.lookup("t", "auto", q) is not None
    near = [("user", "what is the capital city of france?")]
    assert cache.lookup("t", "auto", near) is None
    cache.embed_entry("t", "auto", q)
    hit = cache.lookup("t", "auto", near)
    assert hit is not None and hit.kind == "semantic"
