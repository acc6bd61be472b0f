"""The synchronous engine: requests in, one step at a time, token deltas out.

Single-threaded by design: only the thread that calls `step()` touches sequences, blocks and
the scheduler. `AsyncEngine` runs it off the asyncio thread.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tandem.engine.block_manager import BlockManager
from tandem.engine.config import EngineConfig
from tandem.engine.loader import load_config, resolve_dtype
from tandem.engine.model_runner import ModelRunner, kv_bytes_per_block
from tandem.engine.scheduler import Scheduler
from tandem.engine.sequence import Sequence, Status
from tandem.protocol import GenerateOutput, GenerateRequest, KvEvent, LoadStats

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
        num_blocks = config.num_gpu_blocks or int(
            config.kv_cache_memory_gb * 2**30 // kv_bytes_per_block(hf, config.block_size, dtype)
        )
        if num_blocks < 1:
            raise ValueError(
                "the KV cache holds no block: raise --kv-cache-memory or --num-gpu-blocks"
            )
        self.max_model_len = self._max_model_len(hf, num_blocks * config.block_size)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens
        )
        self.runner = self._make_runner(num_blocks)
        self.requests: dict[str, list[Sequence]] = {}
        log.info(
            "engine ready: %s, %d KV blocks of %d tokens, max_model_len %d, dtype %s, %s",
            config.model,
            num_blocks,
            config.block_size,
            self.max_model_len,
            dtype,
            config.device,
        )

    def _make_runner(self, num_blocks: int):
        if self.config.engine == "real":
            return ModelRunner(
                self.config, self.hf_config, num_blocks, self.max_model_len, self.eos_token_ids
            )
        if self.config.engine == "mock":
            from tandem.engine.mock import MockRunner, load_perf_model

            return MockRunner(
                self.config,
                self.hf_config.vocab_size,
                self.eos_token_ids,
                load_perf_model(self.config.perf_model),
                kv_usage=lambda: self.block_manager.num_active_blocks / num_blocks,
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
        """Raise ValueError if the request can never be served."""
        n = len(request.prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens, but max_model_len is {self.max_model_len} "
                "(prompt plus at least one generated token must fit)"
            )
        vocab = self.hf_config.vocab_size
        if any(t < 0 or t >= vocab for t in request.prompt_token_ids):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        request.sampling.validate(self.config.max_logprobs)

    def add_request(self, request: GenerateRequest) -> None:
        self.validate(request)
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already running")
        seqs = [
            Sequence(
                request.request_id, i, request.prompt_token_ids, request.sampling, request.lora_name
            )
            for i in range(request.sampling.n)
        ]
        self.requests[request.request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: str, index: int | None = None) -> list[GenerateOutput]:
        """Stop all of a request's sequences, or only sequence `index` of its `n`."""
        seqs = self.requests.get(request_id, [])
        outputs = []
        for seq in seqs:
            if not seq.is_finished and index in (None, seq.index):
                self.scheduler.finish(seq)
                outputs.append(self._output(seq, [], "abort"))
        if all(s.is_finished for s in seqs):
            self.requests.pop(request_id, None)
        return outputs

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[GenerateOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        seqs, sampled = self.runner.execute(batch)
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)
        outputs = []
        if sampled is None:
            return outputs
        for seq, token, logprob in zip(seqs, sampled.token_ids, sampled.logprobs, strict=True):
            seq.token_ids.append(token)
            reason = self._finish_reason(seq, token)
            delta = [token]
            if reason:
                self.scheduler.finish(seq)
                seqs_of_request = self.requests.get(seq.request_id, [])
                if all(s.is_finished for s in seqs_of_request):
                    self.requests.pop(seq.request_id, None)
            outputs.append(
                self._output(seq, delta, reason, [logprob] if logprob is not None else None)
            )
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
        )

    def take_kv_events(self) -> list[KvEvent]:
        return self.block_manager.take_events()

    @property
    def running_sequences(self) -> list[Sequence]:
        return [s for seqs in self.requests.values() for s in seqs if s.status is Status.RUNNING]
