"""Stands in for ModelRunner: sleeps as long as the performance model says, returns tokens."""

from __future__ import annotations

import time

from transformers import PretrainedConfig

from tandem.engine.config import EngineConfig
from tandem.engine.loader import resolve_dtype
from tandem.engine.mock.perf_model import PerfModel
from tandem.engine.model_runner import CPU_KV_CACHE_GB, Launched, kv_bytes_per_block
from tandem.engine.sampler import SampleResult
from tandem.engine.scheduler import ScheduledBatch
from tandem.engine.sequence import Sequence

FIRST_TOKEN = 100  # below are often special tokens


class MockRunner:
    def __init__(
        self,
        config: EngineConfig,
        hf: PretrainedConfig,
        eos_token_ids: set[int],
        perf_model: PerfModel,
        kv_usage,
    ) -> None:
        self.perf_model = perf_model
        self.speedup = config.mock_speedup
        self.vocab_size = hf.vocab_size
        dtype = resolve_dtype(config.dtype, hf, config.device)
        kv_bytes = (config.kv_cache_memory_gb or CPU_KV_CACHE_GB) * 2**30
        block_bytes = kv_bytes_per_block(hf, config.block_size, dtype)
        self.num_blocks = config.num_gpu_blocks or int(kv_bytes // block_bytes)
        self.eos_token_ids = eos_token_ids
        self.kv_usage = kv_usage  # callable: the block manager's current usage
        self.busy_s = 0.0
        self.transfer_gbps = config.mock_transfer_gbps
        self.tiers = None  # ModelledTiers, set by the engine: its loads' time joins a step

    def start(self, max_model_len: int) -> None:
        pass

    def transfer_ms(self, nbytes: int) -> float:
        """A KV transfer between two workers: a fixed 1 ms plus the bytes at the link's rate."""
        return (1.0 + nbytes / (self.transfer_gbps * 1e6)) / self.speedup

    def step_ms(self, batch: ScheduledBatch) -> float:
        prefill_tokens, _, decodes, context = batch.work()
        ms = self.perf_model.prefill_ms(prefill_tokens) if prefill_tokens else 0.0
        if decodes:
            ms += self.perf_model.decode_ms(decodes, context, self.kv_usage())
        return ms / self.speedup

    def launch(self, batch: ScheduledBatch, previous: Launched | None = None) -> Launched:
        seqs, result = self.execute(batch)
        return Launched(seqs, None, result)

    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], SampleResult | None]:
        delay = self.step_ms(batch) / 1000.0
        if self.tiers is not None:
            delay += self.tiers.take_load_s()  # its rates already count the speedup
        if delay > 0:
            time.sleep(delay)
        self.busy_s += delay
        seqs = [
            seq
            for seq, n in zip(batch.seqs, batch.num_tokens, strict=True)
            if seq.num_computed_tokens + n == seq.num_tokens
        ]
        if not seqs:
            return [], None
        return seqs, SampleResult([self._token(s) for s in seqs], [None] * len(seqs))

    def _token(self, seq: Sequence) -> int:
        """A deterministic stand-in token that is never EOS (length limits end mock requests)."""
        span = max(self.vocab_size - FIRST_TOKEN, 1)
        # A function of the tokens so far, as a model's would be: a migrated sequence goes on
        # with the same tokens on another worker.
        token = FIRST_TOKEN + (
            seq.token_ids[-1] * 7919 + seq.num_tokens * 104729 + seq.index * 15485863
        ) % span
        while token in self.eos_token_ids:
            token = FIRST_TOKEN + (token + 1 - FIRST_TOKEN) % span
        return token
