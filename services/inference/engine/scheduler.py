"""Iteration-level continuous batching: chunked prefill, token budget, priorities, preemption.

Lower `Request.priority` values are more urgent: they are admitted first, preempted last when KV blocks
run out, and a waiting request preempts running requests of a strictly larger value when it cannot be
admitted otherwise (no free sequence slot or KV blocks). Preemption is by recompute: the KV is dropped and
the prompt plus the tokens generated so far are prefilled again later, so greedy outputs do not change.
"""

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

    def _preempt_for_priority(self, out: SchedulerOutput) -> None:
        """Make room for the most urgent waiting sequence by preempting less urgent running ones.

        Lower `priority` values are more urgent. Only running sequences with a strictly larger value are
        preempted (never one of equal or higher priority, so equal-priority work cannot thrash), least
        urgent first, and only when that frees enough sequence slots and KV blocks for the waiting
        sequence's first chunk; otherwise nobody is preempted.
        """
        if not self.waiting or not self.running:
            return
        head = self.waiting[0]
        victims = [s for s in reversed(self.running) if s.request.priority > head.request.priority]
        if not victims:
            return
        first_chunk = head.num_tokens
        if self.config.enable_chunked_prefill:
            first_chunk = min(first_chunk, self.config.max_num_batched_tokens)
        need_slots = len(self.running) + 1 - self.config.max_num_seqs
        need_blocks = self.blocks.blocks_for(first_chunk) - self.blocks.num_free_blocks
        chosen: list[Sequence] = []
        freed = 0
        for victim in victims:
            if len(chosen) >= need_slots and freed >= need_blocks:
                break
            chosen.append(victim)
            freed += sum(1 for b in victim.block_ids if self.blocks.ref_counts[b] == 1)
        if len(chosen) < need_slots or freed < need_blocks:
            return
        for victim in chosen:
            self._preempt(victim, out)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=lambda s: s.sort_key)
        self.waiting.sort(key=lambda s: s.sort_key)
        self._preempt_for_priority(out)
        out_of_blocks = False
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
                out_of_blocks = True
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                out.scheduled.append((seq, n))
                budget -= n
                i += 1
        if out_of_blocks:
            return out
        self.waiting.sort(key=lambda s: s.sort_key)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_ids:
                if not seq.request.needs_prompt_logprobs:
                    # Prompt logprobs need logits at every prompt position, so such a request recomputes its
                    # whole prompt instead of reusing cached blocks (its own blocks are still cached for others).
                    seq.block_ids, seq.block_hashes = self.blocks.match_prefix(seq.all_ids, seq.request.cache_salt)
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
