"""Main-content extraction in worker processes.

`extract_page` is pure Python and lxml under the GIL: run in a thread of the service it shares one core
with the event loop, the fetches, the store and gRPC. Worker processes give the crawl the machine's
other cores, and a page that crashes the parser (a native fault in lxml, runaway memory) takes down a
worker, not the service: that page fails with EXTRACT_FAILED and the pool is started anew.

Workers are spawned, never forked: the service's threads (gRPC, SQLite, the default executor) do not
survive a fork. They start on the first page, not with the service (an import of trafilatura and lxml
per worker, about a second).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from llmo.core.logging import get_logger
from llmo.visibility.extract import ExtractedPage, extract_page

log = get_logger(__name__)

MAX_AUTO_PROCESSES = 4


class ExtractionFailed(Exception):
    """The worker extracting the page died (the page is the likely cause)."""


def auto_processes(cpus: int | None = None) -> int:
    """One worker per core but the one the service's event loop uses, at most MAX_AUTO_PROCESSES."""
    available = cpus if cpus is not None else len(os.sched_getaffinity(0))
    return max(1, min(MAX_AUTO_PROCESSES, available - 1))


class ExtractionPool:
    """`extract` runs `extract_page` in `processes` worker processes, or in a thread when that is 0.
    `function` must be importable by name in a fresh interpreter (a module-level function).

    When a worker dies, every page in flight in its pool fails with it. Each of them is tried again,
    one at a time, in a one-worker quarantine pool: a page that kills that worker too is the cause and
    fails with ExtractionFailed; the others succeed."""

    def __init__(self, processes: int, function: Callable[[bytes, str], ExtractedPage] = extract_page) -> None:
        self.processes, self.function = processes, function
        self._pool: ProcessPoolExecutor | None = None
        self._quarantine: ProcessPoolExecutor | None = None
        self._quarantine_lock = asyncio.Lock()
        self.restarts = 0  # pools replaced after a worker died

    @staticmethod
    def _spawned(workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    async def extract(self, html: bytes, url: str) -> ExtractedPage:
        if self.processes == 0:
            return await asyncio.to_thread(self.function, html, url)
        if self._pool is None:
            self._pool = self._spawned(self.processes)
        pool = self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, self.function, html, url)
        except BrokenProcessPool:
            if self._pool is pool:  # the first page to notice replaces the pool
                self._pool = None
                self._retire(pool, url)
        async with self._quarantine_lock:
            if self._quarantine is None:
                self._quarantine = self._spawned(1)
            quarantine = self._quarantine
            try:
                return await asyncio.get_running_loop().run_in_executor(quarantine, self.function, html, url)
            except BrokenProcessPool as exc:
                self._quarantine = None
                self._retire(quarantine, url)
                raise ExtractionFailed(f"the page killed the extraction worker twice: {exc}") from exc

    def _retire(self, pool: ProcessPoolExecutor, url: str) -> None:
        self.restarts += 1
        pool.shutdown(wait=False, cancel_futures=True)
        log.warning("extract.worker_died", url=url, restarts=self.restarts)

    async def close(self) -> None:
        """Stop the workers (pages still queued are cancelled) and wait for them to exit."""
        pools = [p for p in (self._pool, self._quarantine) if p is not None]
        self._pool = self._quarantine = None
        for pool in pools:
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)
