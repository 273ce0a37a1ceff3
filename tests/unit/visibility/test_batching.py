"""The crawler's batchers: concurrent callers share one call, each gets its own result, and a failing call
fails its batch only."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from llmo.visibility.batching import EmbeddingBatcher, WriteBatcher


class CountingEmbedder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.array([[float(len(t)), 1.0] for t in texts], dtype=np.float32)


async def test_concurrent_pages_share_one_embedding_call_and_get_their_own_rows() -> None:
    embedder = CountingEmbedder()
    batcher = EmbeddingBatcher(embedder, max_batch=100)  # type: ignore[arg-type]
    pages = [["a", "bb"], ["ccc"], ["dddd", "e", "ff"]]
    results = await asyncio.gather(*(batcher.encode(p) for p in pages))
    await batcher.close()
    assert len(embedder.calls) == 1 and sorted(embedder.calls[0]) == sorted(t for p in pages for t in p)
    for texts, rows in zip(pages, results, strict=True):
        assert [row[0] for row in rows] == [len(t) for t in texts]
    assert (await EmbeddingBatcher(embedder).encode([])).shape == (0, 384)  # type: ignore[arg-type]


async def test_batches_are_capped_and_writes_of_one_moment_share_a_transaction() -> None:
    written: list[list[int]] = []
    writer: WriteBatcher[int] = WriteBatcher(written.append, max_batch=4)
    await asyncio.gather(*(writer.submit(i) for i in range(10)))
    await writer.close()
    assert sorted(i for batch in written for i in batch) == list(range(10))
    assert [len(b) for b in written] == [4, 4, 2]


async def test_a_failing_write_fails_its_callers_and_the_next_batch_still_goes_through() -> None:
    written: list[list[str]] = []

    def write(items: list[str]) -> None:
        if "bad" in items:
            raise RuntimeError("disk full")
        written.append(items)

    writer: WriteBatcher[str] = WriteBatcher(write)
    outcomes: list[Any] = await asyncio.gather(writer.submit("ok-1"), writer.submit("bad"), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    await writer.submit("ok-2")
    await writer.close()
    assert written == [["ok-2"]]
    with pytest.raises(RuntimeError):
        raise outcomes[0]
