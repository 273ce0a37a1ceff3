"""Per-host pacing of the crawler: at most `concurrency` fetches in flight per host, and fetch starts
spaced by the host's delay.

The delay starts at the largest of 1 / requests_per_second, robots.txt's Crawl-delay and the service's
minimum delay, and adapts to latency the way Scrapy's AutoThrottle does: after each response the
delay moves halfway towards `latency / concurrency` (a slow server gets fewer requests per second),
never below the starting delay; a 429 or 503 doubles it (up to `max_delay_s`). With politeness off
(benchmarks against one's own site) only the concurrency bound remains.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass
class _Host:
    delay_s: float
    floor_s: float
    slots: asyncio.Semaphore
    last_start: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class HostPacer:
    def __init__(self, *, requests_per_second: float, concurrency: int, min_delay_s: float, polite: bool = True,
                 max_delay_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.base_delay_s = max(1.0 / requests_per_second, min_delay_s) if polite else 0.0
        self.concurrency = max(1, concurrency)
        self.polite = polite
        self.max_delay_s = max_delay_s
        self.clock = clock
        self._hosts: dict[str, _Host] = {}

    def _host(self, host: str, crawl_delay_s: float | None) -> _Host:
        state = self._hosts.get(host)
        floor = self.base_delay_s
        if self.polite and crawl_delay_s:
            floor = max(floor, min(crawl_delay_s, self.max_delay_s))
        if state is None:
            state = _Host(delay_s=floor, floor_s=floor, slots=asyncio.Semaphore(self.concurrency))
            self._hosts[host] = state
        elif floor > state.floor_s:  # robots.txt's Crawl-delay became known after the first request
            state.floor_s = floor
            state.delay_s = max(state.delay_s, floor)
        return state

    def delay(self, host: str) -> float:
        state = self._hosts.get(host)
        return state.delay_s if state is not None else self.base_delay_s

    @asynccontextmanager
    async def slot(self, host: str, crawl_delay_s: float | None = None) -> AsyncIterator[None]:
        """Hold a fetch slot of `host`, starting no sooner than its delay after the previous start."""
        state = self._host(host, crawl_delay_s)
        async with state.slots:
            if self.polite:
                async with state.lock:
                    # The delay is read now, so a Crawl-delay learnt since the last start applies to this one.
                    wait = state.last_start + state.delay_s - self.clock()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    state.last_start = self.clock()
            yield

    def observe(self, host: str, latency_s: float, status: int) -> None:
        """Adapt the host's delay to a response's latency and status."""
        state = self._hosts.get(host)
        if state is None or not self.polite:
            return
        if status in (429, 503):
            state.delay_s = min(self.max_delay_s, max(state.delay_s * 2, state.floor_s))
            return
        target = latency_s / self.concurrency
        state.delay_s = min(self.max_delay_s, max(state.floor_s, (state.delay_s + target) / 2))
