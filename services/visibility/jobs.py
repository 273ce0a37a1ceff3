"""The one scheduler of the visibility service's long-running jobs (crawls and share-of-voice runs).

A subclass names how to list the runnable jobs, execute one and mark one failed; this class runs at
most `workers` at a time, picks up new ones when woken (or every second, for jobs another replica or a
restart left), fails a job that raised (never the scheduler), and on stop lets the jobs drain for
`DRAIN_S` before cancelling them: a job sees `stopping` and ends its work in flight, then returns
leaving itself RUNNING, so a restart resumes it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Callable

from llmo.core.logging import get_logger

log = get_logger(__name__)
DRAIN_S = 10.0  # how long a stopping service waits for the work in flight


class JobExecutor(abc.ABC):
    kind = "job"  # named in log lines

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.stopping = False
        self._wake = asyncio.Event()
        self._active: dict[int, asyncio.Task[None]] = {}

    @abc.abstractmethod
    def runnable(self) -> list[int]:
        """Pks of the jobs to execute, interrupted RUNNING ones first (blocking: a store call)."""

    @abc.abstractmethod
    async def execute(self, pk: int) -> None: ...

    @abc.abstractmethod
    def fail(self, pk: int, reason: str, message: str) -> None:
        """Mark the job FAILED (blocking: a store call)."""

    def ended(self, pk: int) -> None:  # noqa: B027 - a hook: most subclasses have nothing to do
        """Called when a job's execution ends, however it ended."""

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                for pk in await asyncio.to_thread(self.runnable):
                    if pk not in self._active and len(self._active) < self.workers:
                        task = asyncio.create_task(self._execute_safely(pk))
                        self._active[pk] = task
                        task.add_done_callback(self._on_done(pk))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the store is unreachable: try again shortly
                log.warning(f"{self.kind} scheduling failed", error=repr(error))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()

    def _on_done(self, pk: int) -> Callable[[asyncio.Task[None]], None]:
        def done(_task: asyncio.Task[None]) -> None:
            self._active.pop(pk, None)
            self._wake.set()
            self.ended(pk)

        return done

    async def close(self) -> None:
        """Let the jobs finish their work in flight, then cancel what still runs after `DRAIN_S`."""
        self.stopping = True
        if self._active:
            await asyncio.wait(list(self._active.values()), timeout=DRAIN_S)
        for task in list(self._active.values()):
            task.cancel()
        for task in list(self._active.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _execute_safely(self, pk: int) -> None:
        try:
            await self.execute(pk)
        except asyncio.CancelledError:
            raise  # service stopping: the job stays RUNNING and resumes on the next start
        except Exception as error:
            log.error(f"{self.kind} failed", pk=pk, error=repr(error))
            await asyncio.to_thread(self.fail, pk, "INTERNAL_ERROR", repr(error)[:500])
