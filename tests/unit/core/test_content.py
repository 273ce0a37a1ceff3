"""Content on completed events: the deterministic sample and the bounds."""

from __future__ import annotations

from llmo.core.content import MAX_CONTEXTS, completion_content, sampled


def test_the_sample_is_deterministic_and_about_the_configured_share() -> None:
    keys = [f"req-{i}" for i in range(20_000)]
    picked = [k for k in keys if sampled(k, 0.25)]
    assert picked == [k for k in keys if sampled(k, 0.25)]  # every replica, every redelivery agrees
    assert 0.23 < len(picked) / len(keys) < 0.27
    assert set(picked) <= {k for k in keys if sampled(k, 0.5)}  # a larger share keeps the smaller one's picks
    assert all(sampled(k, 1.0) for k in keys[:10]) and not any(sampled(k, 0.0) for k in keys[:10])
    assert not sampled("", 0.5)


def test_content_is_cut_to_its_bounds_and_says_so() -> None:
    small = completion_content("q", "a", ["c1"])
    assert (small.input, small.output, list(small.contexts), small.truncated) == ("q", "a", ["c1"], False)
    big = completion_content("x" * 50, "y" * 10, [str(i) for i in range(MAX_CONTEXTS + 2)], limit=20)
    assert big.input == "x" * 20 and big.output == "y" * 10 and len(big.contexts) == MAX_CONTEXTS and big.truncated
