"""Continuous batching: which sequences run this step, and how many of their tokens.

Every sequence has `num_tokens` (prompt + generated) and `num_computed_tokens` (in the KV
cache); a step computes some of the difference. A decode is simply a sequence one token behind,
so prefill and decode share one rule, and a long prompt is cut into chunks under the per-step
token budget so running decodes keep flowing. When blocks run out, the most recently admitted
sequence is preempted: its blocks are freed and it waits to be recomputed (its full blocks
usually come straight back from the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from corral.engine.kv_cache import BlockManager
from corral.engine.sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    watermark_blocks: int = 1  # kept free when admitting new work, to avoid instant preemption


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]  # decodes (one token) first, then prefill chunks
    num_new_tokens: list[int]
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # optional gate on admission (the engine's LoRA slots): False keeps the queue waiting
        self.can_admit = None

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = Status.WAITING
        (self.waiting.appendleft if front else self.waiting.append)(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        chosen: list[tuple[Sequence, int]] = []
        preempted = 0
        i = 0
        bs = self.bm.block_size
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if seq.num_computed_tokens + n <= len(seq.block_table) * bs:  # its blocks hold it
                chosen.append((seq, n))
                budget -= n
                i += 1
                continue
            while not self.bm.allocate_slots(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            else:
                chosen.append((seq, n))
                budget -= n
                i += 1
        if not preempted:
            self._admit(chosen, budget)
        # decodes first so attention batches them (see model/attention.py)
        chosen.sort(key=lambda c: c[1] != 1)
        return ScheduledBatch([s for s, _ in chosen], [n for _, n in chosen], preempted)

    def _admit(self, chosen: list[tuple[Sequence, int]], budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self.can_admit is not None and not self.can_admit(seq, self.running):
                break
            fresh = not seq.block_table
            if fresh:
                seq.num_computed_tokens = self.bm.allocate_prefix(seq)
                seq.num_cached_tokens = seq.num_computed_tokens
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.bm.allocate_slots(seq, n, reserve=self.config.watermark_blocks):
                if fresh:  # give the prefix blocks back; try again next step
                    self.bm.free_seq(seq)
                    seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            chosen.append((seq, n))
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_seq(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq, front=True)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and free its blocks."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq.status == Status.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass  # a child of an n>1 request not yet handed to the scheduler
        self.bm.free_seq(seq)
        seq.status = Status.FINISHED
