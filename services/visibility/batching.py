"""Batching for the crawler: one MiniLM call for the passages of many pages, one transaction for the
pages recorded at the same moment.

A crawl scores pages concurrently and each page has a few passages; encoding them page by page
pays the model's per-call cost for every handful of texts. `EmbeddingBatcher` collects the texts
that concurrent callers ask for, encodes up to `max_batch` of them in one call off the event loop,
and hands each caller its rows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from llmo.embedding import EMBEDDING_DIM, Embedder

T = TypeVar("T")


@dataclass
class _Request:
    texts: list[str]
    done: asyncio.Future[np.ndarray]


class EmbeddingBatcher:
    def __init__(self, embedder: Embedder, *, max_batch: int = 128, linger_s: float = 0.005) -> None:
        self.embedder, self.max_batch, self.linger_s = embedder, max_batch, linger_s
        self._pending: list[_Request] = []
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    async def encode(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 vectors of `texts`, shape (len(texts), 384)."""
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run())
        request = _Request(list(texts), asyncio.get_running_loop().create_future())
        self._pending.append(request)
        self._wake.set()
        return await request.done

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.linger_s)  # let the pages scored at the same moment join the batch
            while self._pending:
                batch: list[_Request] = []
                size = 0
                while self._pending and (not batch or size + len(self._pending[0].texts) <= self.max_batch):
                    request = self._pending.pop(0)
                    batch.append(request)
                    size += len(request.texts)
                texts = [t for r in batch for t in r.texts]
                try:
                    vectors = await asyncio.to_thread(self.embedder.encode, texts)
                except Exception as error:  # the caller's page fails, not the batcher
                    for request in batch:
                        if not request.done.done():
                            request.done.set_exception(error)
                    continue
                start = 0
                for request in batch:
                    if not request.done.done():
                        request.done.set_result(vectors[start:start + len(request.texts)])
                    start += len(request.texts)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker


class WriteBatcher(Generic[T]):
    """Items written by `write` (a blocking function, run off the event loop) in one call per batch:
    concurrent `submit` calls within `linger_s` share one transaction. `submit` returns once its item is
    written, so callers keep their at-most-once bookkeeping."""

    def __init__(self, write: Callable[[list[T]], None], *, max_batch: int = 64, linger_s: float = 0.01) -> None:
        self.write, self.max_batch, self.linger_s = write, max_batch, linger_s
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run())
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, done))
        self._wake.set()
        await done

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.linger_s)
            while self._pending:
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
                try:
                    await asyncio.to_thread(self.write, [item for item, _ in batch])
                except Exception as error:  # every item of the batch fails; the next batch is tried anew
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(error)
                    continue
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
