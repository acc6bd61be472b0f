"""The synchronous engine: requests in, one step at a time, token deltas out.

Single-threaded by design: only the thread that calls `step()` touches sequences, blocks and
the scheduler. `AsyncEngine` runs it off the asyncio thread.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from tandem.engine.block_manager import BlockManager
from tandem.engine.config import EngineConfig
from tandem.engine.kv_handoff import KvHandoff
from tandem.engine.loader import load_config, resolve_dtype
from tandem.engine.model_runner import ModelRunner
from tandem.engine.models.llama import head_dim_of
from tandem.engine.request_checks import RequestLimits, check_request
from tandem.engine.sampler import penalised
from tandem.engine.scheduler import ScheduledBatch, Scheduler
from tandem.engine.sequence import PENDING, RUNNING, Sequence
from tandem.engine.step_fit import StepTimes
from tandem.kvbm.tiers import KvTiers
from tandem.protocol import (
    GenerateOutput,
    GenerateRequest,
    KvEvent,
    KvLayout,
    LoadStats,
)
from tandem.protocol.observations import StepSample

log = logging.getLogger(__name__)


def eos_token_ids(model_path: str, hf_config) -> set[int]:
    ids: set[int] = set()
    sources = [getattr(hf_config, "eos_token_id", None)]
    gen = Path(model_path) / "generation_config.json"
    if gen.exists():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return ids


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        hf = load_config(config.model)
        self.hf_config = hf
        self.eos_token_ids = eos_token_ids(config.model, hf)
        dtype = resolve_dtype(config.dtype, hf, config.device)
        self.runner = self._make_runner()
        num_blocks = self.runner.num_blocks
        self.max_model_len = self._max_model_len(hf, num_blocks * config.block_size)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens
        )
        self.runner.start(self.max_model_len)
        # Overlapped steps (`async_scheduling`, vLLM's name): the step queued on the device
        # whose tokens the next step reads. The mock has no device to overlap with.
        overlap = config.async_scheduling
        if overlap is None:
            overlap = config.device.startswith("cuda")
        self.async_scheduling = overlap and config.engine == "real"
        self._in_flight = None
        self.num_overlapped_steps = 0
        self.step_times = StepTimes(launch_queues=config.device.startswith("cuda"))
        self.requests: dict[str, list[Sequence]] = {}
        self.kv_layout = KvLayout(
            num_layers=hf.num_hidden_layers,
            block_size=config.block_size,
            num_kv_heads=hf.num_key_value_heads,
            head_dim=head_dim_of(hf),
            dtype=str(dtype).removeprefix("torch."),
        )
        self.block_manager.tiers = self._make_tiers()
        self.limits = RequestLimits(hf.vocab_size, self.max_model_len, config.max_logprobs,
                                    config.block_size, self.kv_layout)  # fmt: skip
        self.handoff = KvHandoff(
            self.block_manager,
            self.scheduler,
            self.kv_layout,
            config.kv_export_ttl,
            self.kv_caches,
            getattr(self.runner, "transfer_ms", None),
        )
        log.info(
            "engine ready: %s, %d KV blocks of %d tokens, max_model_len %d, dtype %s, %s",
            config.model,
            num_blocks,
            config.block_size,
            self.max_model_len,
            dtype,
            config.device,
        )

    def _make_runner(self):
        if self.config.engine == "real":
            return ModelRunner(self.config, self.hf_config, self.eos_token_ids)
        if self.config.engine == "mock":
            from tandem.engine.mock import MockRunner, load_perf_model

            return MockRunner(
                self.config,
                self.hf_config,
                self.eos_token_ids,
                load_perf_model(self.config.perf_model),
                kv_usage=lambda: self.block_manager.num_active_blocks / self.runner.num_blocks,
            )
        raise ValueError(f"unknown engine {self.config.engine!r}: choose real or mock")

    def _max_model_len(self, hf, kv_tokens: int) -> int:
        model_max = getattr(hf, "max_position_embeddings", None) or kv_tokens
        wanted = self.config.max_model_len
        if wanted is not None:
            if wanted > model_max:
                raise ValueError(
                    f"max_model_len {wanted} exceeds the model's {model_max} positions"
                )
            if wanted > kv_tokens:
                raise ValueError(
                    f"max_model_len {wanted} needs more KV cache than the {kv_tokens} tokens "
                    "allocated: raise --kv-cache-memory / --num-gpu-blocks or lower --max-model-len"
                )
            return wanted
        if model_max > kv_tokens:
            log.warning("max_model_len capped at %d tokens, the KV cache's capacity", kv_tokens)
        return min(model_max, kv_tokens)

    def validate(self, request: GenerateRequest) -> None:
        """Raise ValueError if the request can never be served (`request_checks`)."""
        check_request(request, self.limits)

    def add_request(self, request: GenerateRequest) -> None:
        self.validate(request)
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already running")
        first = request.sequence_index
        prompt, sampling, lora = request.prompt_token_ids, request.sampling, request.lora_name
        seqs = [
            Sequence(request.request_id, first + i, prompt, sampling, lora)
            for i in range(sampling.n)
        ]
        seqs[0].token_ids += request.output_token_ids  # a migrated request goes on after them
        self.requests[request.request_id] = seqs
        if request.kv_export:
            self.handoff.exporting.add(request.request_id)
        if request.kv_import is not None:
            self.handoff.prepare_import(seqs[0], request.kv_import)
            return
        for seq in seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: str, index: int | None = None) -> list[GenerateOutput]:
        """Stop all of a request's sequences, or only sequence `index` of its `n`."""
        seqs = self.requests.get(request_id, [])
        outputs = []
        importing = self.handoff.abort_import(request_id)
        if importing is not None:
            outputs.append(self._output(importing, [], "abort"))
        for seq in seqs:
            if not seq.is_finished and index in (None, seq.index):
                self.scheduler.finish(seq)
                outputs.append(self._output(seq, [], "abort"))
        if all(s.is_finished for s in seqs):
            self.requests.pop(request_id, None)
            self.handoff.exporting.discard(request_id)
        return outputs

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    def step(self) -> list[GenerateOutput]:
        """Run one batch; return the tokens that became known. With `async_scheduling` a
        step queues its batch on the device before reading the previous step's tokens, so
        the host's bookkeeping overlaps the GPU's work (outputs then lag one step)."""
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        work = batch.work()
        if not self._overlappable(batch):
            outputs = self._resolve()
            if outputs:  # only the resolved step can have finished some since scheduling
                batch = _without_finished(batch)
                work = batch.work()
            outputs += self._run(batch) if batch else []
            self.step_times.synchronous(work if batch else None, time.perf_counter() - started)
        else:
            launched = self.runner.launch(batch, self._in_flight) if batch else None
            outputs = self._resolve()
            if launched is not None:
                self.num_overlapped_steps += 1
                self._advance(batch)
                self._hold_pending(launched)
            self._in_flight = launched
            ran = work if launched is not None else None
            self.step_times.overlapped(ran, time.perf_counter() - started)
        return outputs

    def _run(self, batch: ScheduledBatch) -> list[GenerateOutput]:
        launched = self.runner.launch(batch)
        self._advance(batch)
        return self._process(launched.seqs, launched.result(), replace=False)

    def _advance(self, batch: ScheduledBatch) -> None:
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            if not seq.is_finished:
                seq.num_computed_tokens += n
                self.block_manager.commit(seq)

    def _overlappable(self, batch: ScheduledBatch) -> bool:
        """Whether the batch may be queued before the previous step's tokens are read: not
        when a sequence needs its tokens on the host (penalties, logprobs, a KV export)."""
        return self.async_scheduling and all(
            not penalised(s.sampling)
            and s.sampling.logprobs is None
            and s.request_id not in self.handoff.exporting
            for s in batch.seqs
        )

    def _hold_pending(self, launched) -> None:
        """Give each sequence of an overlapped step a PENDING token, so the next schedule
        sees the token coming; one that token ends by length is not scheduled again."""
        for i, seq in enumerate(launched.seqs):
            if seq.is_finished:
                continue
            seq.token_ids.append(PENDING)
            seq.pending_index = i
            p = seq.sampling
            seq.final = (
                seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len
            )

    def _resolve(self) -> list[GenerateOutput]:
        launched, self._in_flight = self._in_flight, None
        if launched is None:
            return []
        return self._process(launched.seqs, launched.result(), replace=True)

    def _process(self, seqs: list[Sequence], sampled, replace: bool) -> list[GenerateOutput]:
        """Hand out a step's sampled tokens: a PENDING one is replaced (`replace`), else the
        token is appended; then stop checks and outputs. Sequences that finished or were
        aborted while their step was in flight drop its token."""
        outputs = []
        if sampled is None:
            return outputs
        for seq, token, logprob in zip(seqs, sampled.token_ids, sampled.logprobs, strict=True):
            if seq.is_finished:
                continue
            if replace:
                seq.token_ids[-1] = token
                seq.final = False
            else:
                seq.token_ids.append(token)
            reason = self._finish_reason(seq, token)
            delta = [token]
            export = reason is None and seq.request_id in self.handoff.exporting
            if reason or export:
                if export:
                    self.scheduler.detach(seq)  # off the batch, its blocks kept for transfer
                else:
                    self.scheduler.finish(seq)
                seqs_of_request = self.requests.get(seq.request_id, [])
                if all(s.is_finished for s in seqs_of_request):
                    self.requests.pop(seq.request_id, None)
                    self.handoff.exporting.discard(seq.request_id)
            out = self._output(seq, delta, reason, [logprob] if logprob is not None else None)
            if export:
                out.kv_transfer = self.handoff.export(seq)
            outputs.append(out)
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.sampling
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            seq.stop_token_id = token
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, seq: Sequence, delta: list[int], reason: str | None, logprobs=None):
        return GenerateOutput(
            request_id=seq.request_id,
            index=seq.index,
            token_ids=delta,
            logprobs=logprobs,
            finish_reason=reason,
            stop_token_id=seq.stop_token_id if reason == "stop" else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
        )

    def _make_tiers(self) -> KvTiers | None:
        """The host and disk KV tiers the config asks for, under this engine's caches."""
        c = self.config
        if bool(c.kv_disk_path) != bool(c.kv_disk_size):
            raise ValueError("--kv-disk-path and --kv-disk-size go together")
        if not (c.kv_offloading_size or c.kv_disk_path):
            return None
        if not c.enable_prefix_caching:
            raise ValueError("KV tiers need prefix caching on")
        gib = 2**30
        if c.engine == "mock":
            return self._modelled_tiers()
        caches = self.kv_caches()
        if caches is None:
            raise ValueError("KV tiers need the real or the mock engine")
        return KvTiers.build(
            self.kv_layout, c.model, caches, self.block_manager.emit,
            host_bytes=int(c.kv_offloading_size * gib), disk_path=c.kv_disk_path,
            disk_bytes=int(c.kv_disk_size * gib), recompute_s=self._recompute_block_s,
        )  # fmt: skip

    def _modelled_tiers(self):
        from tandem.engine.mock.tiers import ModelledTiers

        c, block = self.config, self.kv_layout.block_bytes
        per_gb = 1e9 / block * c.mock_speedup  # blocks a second per GB/s, as fast as the steps
        tiers = ModelledTiers(
            int(c.kv_offloading_size * 2**30 // block), int(c.kv_disk_size * 2**30 // block),
            self.block_manager.emit, host_blocks_per_s=c.mock_host_gbps * per_gb,
            disk_blocks_per_s=c.mock_disk_gbps * per_gb, recompute_s=self._recompute_block_s,
        )  # fmt: skip
        self.runner.tiers = tiers
        return tiers

    def _recompute_block_s(self) -> float | None:
        rate = self.step_times.prefill_tokens_per_s()
        return self.config.block_size / rate if rate else None

    def kv_caches(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The K and V caches, `[layers, blocks, block_size, kv_heads, head_dim]` (the layout
        `kv_layout` names); None for the mock engine, which holds no KV data."""
        attention = getattr(self.runner, "attention", None)
        return (attention.k_cache, attention.v_cache) if attention is not None else None

    def stats(self) -> LoadStats:
        bm = self.block_manager
        return LoadStats(
            active_blocks=bm.num_active_blocks,
            free_blocks=bm.num_free_blocks,
            total_blocks=bm.num_blocks,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            queued_prefill_tokens=self.scheduler.queued_prefill_tokens(),
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            kv_imports=self.handoff.imports,
            kv_import_fallbacks=self.handoff.import_fallbacks,
            kv_exports_expired=self.handoff.exports_expired,
            prefill_tokens_per_s=self.step_times.prefill_tokens_per_s(),
            **self._tier_figures(),
        )

    def _tier_figures(self) -> dict[str, float]:
        tiers = self.block_manager.tiers
        if tiers is None:
            return {}
        return {"kv_host_hits": tiers.hits["host"], "kv_disk_hits": tiers.hits["disk"],
                "kv_tier_load_failures": tiers.failed_loads,
                "host_blocks_per_s": tiers.rates["host"].value,
                "disk_blocks_per_s": tiers.rates["disk"].value}  # fmt: skip

    def take_kv_events(self) -> list[KvEvent]:
        return self.block_manager.take_events()

    def take_step_samples(self) -> list[StepSample]:
        return self.step_times.take_samples()

    @property
    def running_sequences(self) -> list[Sequence]:
        return [s for seqs in self.requests.values() for s in seqs if s.status is RUNNING]


def _without_finished(batch: ScheduledBatch) -> ScheduledBatch:
    """The batch less the sequences that finished since it was scheduled."""
    kept = [(s, n) for s, n in zip(batch.seqs, batch.num_tokens, strict=True) if not s.is_finished]
    return ScheduledBatch([s for s, _ in kept], [n for _, n in kept])
