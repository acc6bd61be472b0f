"""Continuous batching under a token budget, with chunked prefill and preemption.

Every step gets `max_num_batched_tokens` tokens to spend. Running sequences go first (a
decode costs one token, an unfinished prefill continues with what the budget allows), then
waiting ones are admitted while budget, sequence slots and KV blocks last. When a running
sequence needs a block and none is free, the most recently admitted running sequence is
preempted: its blocks are released (cached ones stay findable) and it is recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from tandem.engine.block_manager import BlockManager
from tandem.engine.sequence import FINISHED, PENDING, RUNNING, WAITING, Sequence


class StepWork(NamedTuple):
    """What a step's time depends on."""

    prompt_tokens: int  # prompt tokens computed
    prompt_pairs: int  # (query, key) pairs their attention covers
    decodes: int  # sequences decoding one token
    context: int  # KV tokens those decodes read


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens computed this step, per seq

    def __bool__(self) -> bool:
        return bool(self.seqs)

    def work(self) -> StepWork:
        prompt_tokens = pairs = decodes = context = 0
        for seq, n in zip(self.seqs, self.num_tokens, strict=True):
            done = seq.num_computed_tokens
            if n == 1 and done >= seq.num_prompt_tokens:
                decodes += 1
                context += done + 1
            else:
                prompt_tokens += n
                pairs += n * done + n * (n + 1) // 2
        return StepWork(prompt_tokens, pairs, decodes, context)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def queued_prefill_tokens(self) -> int:
        waiting = sum(s.num_tokens - s.num_computed_tokens for s in self.waiting)
        partial = sum(
            s.num_tokens - s.num_computed_tokens - 1
            for s in self.running
            if s.num_computed_tokens < s.num_tokens - 1
        )
        return waiting + partial

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.final:  # its token in flight ends it: nothing more to compute
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.bm.allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_tokens.append(n)
                budget -= n
                i += 1
        if preempted:
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.token_ids[-1] == PENDING:  # preempted while its token was in flight
                break
            # A sequence with blocks already (its KV imported) has nothing to match. While
            # others run, a prefix read from disk makes it wait (None); alone, it waits here.
            hits = [] if seq.block_table else self.bm.match_prefix(
                seq, budget, wait=bool(self.running))  # fmt: skip
            if hits is None:
                break
            done = seq.num_computed_tokens + len(hits) * self.bm.block_size
            n = min(seq.num_tokens - done, budget)
            if not self.bm.allocate(seq, n, hits):
                break
            self.waiting.popleft()
            if seq.num_output_tokens == 0 and seq.num_cached_tokens == 0:
                seq.num_cached_tokens = len(hits) * self.bm.block_size
                self.bm.prefix_queries += seq.num_tokens
                self.bm.prefix_hits += seq.num_cached_tokens
            seq.status = RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        return batch

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and release its blocks."""
        if seq.status is RUNNING:
            self.running.remove(seq)
        elif seq.status is WAITING:
            self.waiting.remove(seq)
        seq.status = FINISHED
        self.bm.free_seq(seq)

    def detach(self, seq: Sequence) -> None:
        """Take a running sequence off the batch and keep its blocks (its KV is exported)."""
        self.running.remove(seq)
        seq.status = FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.status = WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
