"""Iteration-level continuous batching: chunked prefill, token budget, priorities, preemption."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llmo.inference.engine.block_manager import BlockManager
from llmo.inference.engine.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_chunked_prefill: bool = True


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence (finished or aborted) and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)

    def _free(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_ids)
        seq.block_ids = []
        seq.block_hashes = []
        seq.num_computed = 0

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        # Recompute: drop the KV and requeue; prompt + tokens so far are prefilled again later.
        self.running.remove(seq)
        self._free(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(seq)
        out.preempted.append(seq)

    def _grow(self, seq: Sequence, num_new: int) -> bool:
        need = self.blocks.blocks_for(seq.num_computed + num_new) - len(seq.block_ids)
        if need <= 0:
            return True
        if need > self.blocks.num_free_blocks:
            return False
        seq.block_ids.extend(self.blocks.allocate(need))
        return True

    def _chunk(self, seq: Sequence, budget: int) -> int:
        if self.config.enable_chunked_prefill:
            return min(seq.remaining, budget)
        return seq.remaining if seq.remaining <= budget else 0

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=lambda s: s.sort_key)
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            n = self._chunk(seq, budget)
            if n == 0:
                i += 1
                continue
            while not self._grow(seq, n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                out.scheduled.append((seq, n))
                budget -= n
                i += 1
        if out.preempted:
            return out
        self.waiting.sort(key=lambda s: s.sort_key)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_ids:
                seq.block_ids, seq.block_hashes = self.blocks.match_prefix(seq.all_ids)
                seq.num_computed = len(seq.block_ids) * self.blocks.block_size
                if seq.request.first_scheduled_time is None:
                    seq.request.num_cached_tokens = seq.num_computed
            n = self._chunk(seq, budget)
            if n == 0 or not self._grow(seq, n):
                self._free(seq)
                break
            self.waiting.pop(0)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            if seq.request.first_scheduled_time is None:
                seq.request.first_scheduled_time = time.monotonic()
            out.scheduled.append((seq, n))
            budget -= n
        return out
