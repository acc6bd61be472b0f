"""A sequence: one of a request's `n` generations, as the scheduler and block manager see it.

It holds no sampler state: seeded noise is a function of (seed, `index`, number of output
tokens), so a sequence rebuilt from its tokens (preemption, a decode worker) continues it."""

from __future__ import annotations

import itertools
from enum import Enum

from tandem.protocol import SamplingParams, TokenLogprob

_ids = itertools.count()

#: The token an overlapped step is still sampling; replaced when the step's ids are read.
PENDING = -1


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


#: The members as module constants: `Status.FINISHED` looks the member up on every use,
#: which showed as 13 % of a batch-256 mock step.
WAITING, RUNNING, FINISHED = Status.WAITING, Status.RUNNING, Status.FINISHED


class Sequence:
    def __init__(
        self,
        request_id: str,
        index: int,
        prompt: list[int],
        sampling: SamplingParams,
        lora_name: str | None = None,
    ) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt)
        self.num_prompt_tokens = len(prompt)
        self.sampling = sampling
        self.lora_name = lora_name
        self.status = WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.pending_index = 0  # overlapped steps: row of its PENDING token in the sampled ids
        self.final = False  # overlapped steps: the PENDING token ends it (length): not rescheduled
        self.num_cached_tokens = 0  # prefix-cache hit when first scheduled
        self.block_hashes: list[int] = []  # sequence hashes of full blocks, in order
        self.local_hashes: list[int] = []
        self.num_committed_blocks = 0  # leading blocks the block manager has already cached
        self.num_emitted = 0  # output tokens already sent to the caller
        self.pending_logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.stop_token_id: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id}#{self.index}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, {self.status.value})"
        )
