"""The native engine: one `step()` schedules, runs the model on the paged batch, samples and detokenizes."""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass, field

import torch

from llmo.inference.engine.adapters import AdapterRegistry
from llmo.inference.engine.block_manager import BlockManager, block_hash
from llmo.inference.engine.params import SamplingParams
from llmo.inference.engine.sampler import prompt_token_logprobs, sample
from llmo.inference.engine.scheduler import Scheduler, SchedulerConfig
from llmo.inference.engine.sequence import Request, SeqStatus, Sequence, SequenceDelta, TokenLogprob
from llmo.inference.models.llama import KVCache, PagedBatch
from llmo.inference.models.loader import LoadedModel
from llmo.inference.models.lora import AdapterError
from llmo.inference.tokenizer import IncrementalDetokenizer


class ContextLengthError(ValueError):
    def __init__(self, message: str, limit: int, requested: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.requested = requested


class QueueFullError(RuntimeError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request queue is full ({limit} requests waiting)")
        self.limit = limit


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int = 512
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_queue: int = 256


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_usage: float
    prefix_hit_rate: float
    num_preemptions: int
    kv_waste: float


@dataclass
class _Rows:
    """Where one scheduled sequence's logits are in a step's output."""

    prompt_start: int = 0  # first prompt position whose next-token logprob this step computes
    prompt_rows: range = field(default_factory=lambda: range(0))
    sample_row: int | None = None  # the row the next token is sampled from, when the step reaches the end


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None,
                 adapters: AdapterRegistry | None = None) -> None:
        self.loaded = loaded
        self.adapters = adapters
        self.config = config or EngineConfig()
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.context_length = loaded.context_length
        device = next(self.model.parameters()).device
        self.device = device
        self.cache = KVCache(loaded.config, self.config.num_blocks, self.config.block_size, loaded.dtype, device)
        self.blocks = BlockManager(self.config.num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(self.config.max_num_seqs, self.config.max_num_batched_tokens,
                            self.config.enable_chunked_prefill),
            self.blocks,
        )
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.eos_ids = set(loaded.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)

    # requests

    def check_length(self, num_prompt_tokens: int, max_tokens: int) -> None:
        total = num_prompt_tokens + max_tokens
        if total > self.context_length:
            raise ContextLengthError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} exceeds the "
                f"model's context length of {self.context_length} tokens",
                self.context_length, total,
            )
        budget = self.config.max_num_batched_tokens
        if not self.config.enable_chunked_prefill and num_prompt_tokens + max_tokens > budget:
            raise ContextLengthError(
                f"prompt + max_tokens = {total} tokens exceeds max_num_batched_tokens ({budget}) and chunked "
                "prefill is off", budget, total,
            )
        if self.blocks.blocks_for(total) > self.config.num_blocks:
            limit = self.config.num_blocks * self.config.block_size
            raise ContextLengthError(
                f"prompt + max_tokens = {total} tokens exceeds the KV cache capacity of {limit} tokens",
                limit, total,
            )

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    priority: int = 0, arrival_time: float | None = None, adapter: str | None = None) -> Request:
        """Queue a request; `adapter` names a loaded LoRA adapter to run it with (None: the base model)."""
        vocab = self.loaded.config.vocab_size
        params.validate(vocab)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if any(t < 0 or t >= vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        self.check_length(len(prompt_ids), params.max_tokens)
        if len(self.scheduler.waiting) >= self.config.max_queue:
            raise QueueFullError(self.config.max_queue)
        request = Request(request_id, list(prompt_ids), params, priority)
        if arrival_time is not None:
            request.arrival_time = arrival_time
        if adapter is not None:
            if self.adapters is None:
                raise AdapterError("ADAPTER_NOT_FOUND", f"no adapter named {adapter!r}: this engine serves no adapters")
            request.adapter = self.adapters.acquire(adapter)
        seq = self._new_sequence(request, 0)
        self.requests[request_id] = request
        self.scheduler.add(seq)
        return request

    def _new_sequence(self, request: Request, index: int) -> Sequence:
        seed = request.params.seed
        generator = torch.Generator().manual_seed(seed + index if seed is not None else secrets.randbits(62))
        detok = IncrementalDetokenizer(self.tokenizer, request.params.skip_special_tokens)
        detok.prime(request.prompt_ids)
        seq = Sequence(next(self._seq_ids), index, request, detok, generator)
        request.sequences.append(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its KV blocks now. Returns whether it was still known."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self._release_adapter(request)
        for seq in request.sequences:
            if seq.status is not SeqStatus.FINISHED:
                self.scheduler.remove(seq)
                seq.status = SeqStatus.FINISHED
                seq.finish_reason = "abort"
        return True

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    # one iteration

    def step(self) -> list[SequenceDelta]:
        plan = self.scheduler.schedule()
        if plan.empty:
            return []
        multi = [(s, n) for s, n in plan.scheduled if n > 1]
        single = [(s, n) for s, n in plan.scheduled if n == 1]
        ordered = multi + single
        batch, rows = self._build_batch(ordered, len(multi))
        lora_rows = self._lora_rows(ordered)
        with torch.inference_mode():
            if lora_rows is not None:
                assert self.adapters is not None
                self.adapters.slots.context.indices = lora_rows
            try:
                # Sampling runs on the CPU so per-request seeded generators work on every device.
                logits = self.model.forward_paged(batch, self.cache).cpu()
            finally:
                if lora_rows is not None:
                    assert self.adapters is not None
                    self.adapters.slots.context.indices = None
        to_sample: list[tuple[Sequence, int]] = []
        for (seq, n), where in zip(ordered, rows, strict=True):
            if where.prompt_rows:
                self._record_prompt_logprobs(seq.request, where.prompt_start,
                                             logits[where.prompt_rows.start:where.prompt_rows.stop])
            seq.num_computed += n
            self._register_full_blocks(seq)
            if where.sample_row is not None:
                to_sample.append((seq, where.sample_row))
        deltas: list[SequenceDelta] = []
        now = time.monotonic()
        for seq, row in to_sample:
            request = seq.request
            if request.params.max_tokens == 0:  # prompt logprobs only: nothing to sample
                deltas.append(self._attach_prompt_logprobs(request, self._finish_without_tokens(seq)))
                continue
            family = [seq]
            if request.params.n > 1 and not request.forked:
                family += self._fork(seq)
            for member in family:
                token, lp = sample(logits[row], request.params, member.all_ids, member.generator)
                if request.first_token_time is None:
                    request.first_token_time = now
                deltas.append(self._attach_prompt_logprobs(request, self._append(member, token, lp)))
        for stepped in {d.request_id: self.requests.get(d.request_id) for d in deltas}.values():
            if stepped is not None and stepped.finished:
                stepped.finished_time = now
                self.requests.pop(stepped.request_id, None)
                self._release_adapter(stepped)
        return deltas

    def _release_adapter(self, request: Request) -> None:
        if request.adapter is not None and self.adapters is not None:
            self.adapters.release(request.adapter)
            request.adapter = None

    def _lora_rows(self, ordered: list[tuple[Sequence, int]]) -> torch.Tensor | None:
        """The adapter slot of every token row of the step (-1: base), or None when no row has one."""
        if self.adapters is None or not any(seq.request.adapter is not None for seq, _ in ordered):
            return None
        slots: list[int] = []
        for seq, n in ordered:
            handle = seq.request.adapter
            slots.extend([handle.slot if handle is not None else -1] * n)
        return torch.tensor(slots, dtype=torch.int64, device=self.device)

    def _build_batch(self, ordered: list[tuple[Sequence, int]], num_prefills: int
                     ) -> tuple[PagedBatch, list[_Rows]]:
        bs = self.config.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        rows: list[_Rows] = []
        for seq, n in ordered:
            ids = seq.all_ids
            base = len(tokens)
            start = seq.num_computed
            for pos in range(start, start + n):
                tokens.append(ids[pos])
                positions.append(pos)
                slots.append(seq.block_ids[pos // bs] * bs + pos % bs)
            where = _Rows()
            request = seq.request
            if request.needs_prompt_logprobs and start <= len(request.prompt_logprobs):
                # Position p's logits give the logprob of prompt token p + 1; positions done before a
                # preemption are not collected twice.
                first = len(request.prompt_logprobs)
                last = min(start + n, len(request.prompt_ids) - 1)
                if first < last:
                    where.prompt_start = first
                    where.prompt_rows = range(len(logits_rows), len(logits_rows) + last - first)
                    logits_rows.extend(base + p - start for p in range(first, last))
            if start + n == seq.num_tokens:
                where.sample_row = len(logits_rows)
                logits_rows.append(len(tokens) - 1)
            rows.append(where)
        width = max(len(seq.block_ids) for seq, _ in ordered)
        tables = torch.zeros((len(ordered), width), dtype=torch.int64)
        for i, (seq, _) in enumerate(ordered):
            tables[i, : len(seq.block_ids)] = torch.tensor(seq.block_ids, dtype=torch.int64)
        dev = self.device
        batch = PagedBatch(
            token_ids=torch.tensor(tokens, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_lens=[n for _, n in ordered],
            context_lens=[seq.num_computed + n for seq, n in ordered],
            block_tables=tables.to(dev),
            num_prefills=num_prefills,
            logits_indices=torch.tensor(logits_rows, dtype=torch.int64, device=dev),
        )
        return batch, rows

    def _record_prompt_logprobs(self, request: Request, first: int, logits: torch.Tensor) -> None:
        k = request.params.prompt_logprobs or 0
        targets = request.prompt_ids[first + 1:first + 1 + logits.shape[0]]
        request.prompt_logprobs.extend(prompt_token_logprobs(logits, targets, k))

    @staticmethod
    def _attach_prompt_logprobs(request: Request, delta: SequenceDelta) -> SequenceDelta:
        """Hand the prompt logprobs out once, on the request's first delta."""
        if request.params.prompt_logprobs is not None and not request.prompt_logprobs_sent:
            delta.prompt_logprobs = list(request.prompt_logprobs)
            request.prompt_logprobs_sent = True
        return delta

    def _finish_without_tokens(self, seq: Sequence) -> SequenceDelta:
        """max_tokens = 0 (prompt logprobs only): the request ends once its prompt is prefilled."""
        request = seq.request
        seq.finish_reason = "length"
        seq.status = SeqStatus.FINISHED
        self.scheduler.remove(seq)
        return SequenceDelta(
            request_id=request.request_id, index=seq.index, token_ids=[], text="", logprobs=[],
            finish_reason="length", num_prompt_tokens=len(request.prompt_ids), num_output_tokens=0,
            num_cached_tokens=request.num_cached_tokens,
        )

    def _register_full_blocks(self, seq: Sequence) -> None:
        bs = self.config.block_size
        full = seq.num_computed // bs
        ids = seq.all_ids
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.request.cache_salt
            h = block_hash(parent, ids[i * bs:(i + 1) * bs])
            seq.block_hashes.append(h)
            self.blocks.register(seq.block_ids[i], h)

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """Children for n > 1 share the prompt's full blocks; a partial last block is copied."""
        request = parent.request
        request.forked = True
        bs = self.config.block_size
        children: list[Sequence] = []
        for index in range(1, request.params.n):
            child = self._new_sequence(request, index)
            full = parent.num_computed // bs
            shared = parent.block_ids[:full]
            partial = parent.block_ids[full:]
            if partial and self.blocks.num_free_blocks < 1:
                self.scheduler.add(child)  # no room to copy: it recomputes from the prefix cache later
                children.append(child)
                continue
            self.blocks.share(shared)
            child.block_ids = list(shared)
            if partial:
                (dst,) = self.blocks.allocate(1)
                for layer_k, layer_v in zip(self.cache.key, self.cache.value, strict=True):
                    layer_k[dst].copy_(layer_k[partial[0]])
                    layer_v[dst].copy_(layer_v[partial[0]])
                child.block_ids.append(dst)
            child.block_hashes = list(parent.block_hashes)
            child.num_computed = parent.num_computed
            child.status = SeqStatus.RUNNING
            self.scheduler.running.append(child)
            children.append(child)
        return children

    def _append(self, seq: Sequence, token: int, lp: TokenLogprob | None) -> SequenceDelta:
        """Record a sampled token, detokenize it, apply the stop conditions, build the delta."""
        request = seq.request
        params = request.params
        seq.output_ids.append(token)
        if lp is not None:
            seq.logprobs.append(lp)
        finish: str | None = None
        stop_token = (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids
        if stop_token:
            finish = "stop"
        else:
            seq.text += seq.detokenizer.add(token)
            if len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.context_length:
                seq.text += seq.detokenizer.flush()
                finish = "length"
        if params.stop:
            window = max(len(s) for s in params.stop) + 16
            start = max(0, seq.emitted_chars - window)
            hits = [i for i in (seq.text.find(s, start) for s in params.stop) if i >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                finish = "stop"
        visible = len(seq.text) if finish else len(seq.text) - _stop_holdback(seq.text, params.stop)
        visible = max(visible, seq.emitted_chars)
        text = seq.text[seq.emitted_chars:visible]
        seq.emitted_chars = visible
        if finish:
            seq.finish_reason = finish
            seq.status = SeqStatus.FINISHED
            self.scheduler.remove(seq)
        return SequenceDelta(
            request_id=request.request_id, index=seq.index, token_ids=[token], text=text,
            logprobs=[lp] if lp is not None else [], finish_reason=finish,
            num_prompt_tokens=len(request.prompt_ids), num_output_tokens=len(seq.output_ids),
            num_cached_tokens=request.num_cached_tokens,
        )

    # introspection

    def stats(self) -> EngineStats:
        used_slots = sum(s.num_computed for s in self.scheduler.running)
        allocated = sum(len(s.block_ids) for s in self.scheduler.running) * self.config.block_size
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.config.num_blocks,
            kv_blocks_free=self.blocks.num_free_blocks,
            kv_usage=self.blocks.usage(),
            prefix_hit_rate=self.blocks.prefix_hit_rate(),
            num_preemptions=self.scheduler.num_preemptions,
            kv_waste=(allocated - used_slots) / allocated if allocated else 0.0,
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Run prompts to completion synchronously (tests, offline use); returns output ids per prompt."""
        ids = [f"offline-{next(self._seq_ids)}" for _ in prompts]
        outputs: dict[tuple[str, int], list[int]] = {}
        for rid, prompt in zip(ids, prompts, strict=True):
            self.add_request(rid, prompt, params)
        while self.has_unfinished():
            for d in self.step():
                outputs.setdefault((d.request_id, d.index), []).extend(
                    t for t in d.token_ids if not (d.finish_reason == "stop" and t in self.eos_ids)
                )
        return [outputs.get((rid, 0), []) for rid in ids]


def _stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
