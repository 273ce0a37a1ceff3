"""Runs the engine loop off the event loop and streams each request's deltas to its caller."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from llmo.core.logging import get_logger
from llmo.inference.engine.engine import LLMEngine, QueueFullError
from llmo.inference.engine.params import SamplingParams
from llmo.inference.engine.sequence import Request, SequenceDelta
from llmo.inference.models.lora import AdapterError

log = get_logger(__name__)


@dataclass
class _Stream:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int
    submitted: float
    adapter: str | None = None
    queue: asyncio.Queue[list[SequenceDelta] | BaseException] = field(default_factory=asyncio.Queue)
    request: Request | None = None
    finished: set[int] = field(default_factory=set)


@dataclass
class StreamResult:
    deltas: list[SequenceDelta]
    done: bool
    request: Request | None


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._inbox: collections.deque[_Stream] = collections.deque()
        self._aborts: collections.deque[str] = collections.deque()
        self._streams: dict[str, _Stream] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Steps run on their own thread: they never wait for a slot in the default pool behind
        # tokenization or JSON parsing of other requests.
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llmo-engine-step")
        self._task = asyncio.create_task(self._run(), name="llmo-engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        for stream in list(self._streams.values()):
            stream.queue.put_nowait(RuntimeError("the engine stopped"))

    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + len(self._inbox)

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, priority: int = 0,
               adapter: str | None = None) -> _Stream:
        """Validate now (errors raise here) and queue the request for the engine thread; `adapter` names
        a loaded LoRA adapter (an unload before the request reaches the engine fails it there)."""
        vocab = self.engine.loaded.config.vocab_size
        params.validate(vocab)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        # The length check first: it is O(1), the token id scan is not.
        self.engine.check_length(len(prompt_ids), params.max_tokens)
        if any(t < 0 or t >= vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if adapter is not None and (self.engine.adapters is None or self.engine.adapters.get(adapter) is None):
            raise AdapterError("ADAPTER_NOT_FOUND", f"no adapter named {adapter!r} is loaded")
        if self.num_waiting() >= self.engine.config.max_queue:
            raise QueueFullError(self.engine.config.max_queue)
        stream = _Stream(request_id, list(prompt_ids), params, priority, time.monotonic(), adapter)
        self._streams[request_id] = stream
        self._inbox.append(stream)
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Free the request's KV blocks now, or right after the step that is running."""
        self._streams.pop(request_id, None)
        if self._lock.acquire(blocking=False):
            try:
                self._drain_inbox_locked()
                self.engine.abort(request_id)
            finally:
                self._lock.release()
        else:
            self._aborts.append(request_id)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       priority: int = 0, adapter: str | None = None) -> AsyncIterator[StreamResult]:
        stream = self.submit(request_id, prompt_ids, params, priority, adapter)
        done = False
        try:
            while not done:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                for delta in item:
                    if delta.finish_reason is not None:
                        stream.finished.add(delta.index)
                done = len(stream.finished) >= params.n
                yield StreamResult(item, done, stream.request)
        finally:
            if not done:
                self.abort(request_id)
            self._streams.pop(request_id, None)

    def _drain_inbox_locked(self) -> None:
        while self._inbox:
            stream = self._inbox.popleft()
            if self._streams.get(stream.request_id) is not stream:
                continue  # aborted before it reached the engine
            try:
                stream.request = self.engine.add_request(
                    stream.request_id, stream.prompt_ids, stream.params, stream.priority, stream.submitted,
                    stream.adapter,
                )
            except Exception as exc:
                self._post(stream, exc)

    def _step(self) -> list[SequenceDelta]:
        with self._lock:
            while self._aborts:
                self.engine.abort(self._aborts.popleft())
            self._drain_inbox_locked()
            return self.engine.step()

    def _post(self, stream: _Stream, item: list[SequenceDelta] | BaseException) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    async def _run(self) -> None:
        while True:
            if not (self.engine.has_unfinished() or self._inbox or self._aborts):
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                deltas = await asyncio.get_running_loop().run_in_executor(self._executor, self._step)
            except Exception as exc:
                log.exception("engine step failed")
                for stream in list(self._streams.values()):
                    stream.queue.put_nowait(RuntimeError(f"engine step failed: {exc}"))
                    self.abort(stream.request_id)
                continue
            grouped: dict[str, list[SequenceDelta]] = {}
            for delta in deltas:
                grouped.setdefault(delta.request_id, []).append(delta)
            for request_id, items in grouped.items():
                target = self._streams.get(request_id)
                if target is not None:
                    target.queue.put_nowait(items)
