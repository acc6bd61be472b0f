"""Runs one scheduled batch through the model: pack inputs, prepare attention, sample.

On a GPU the runner also sizes the KV cache from the memory left after a profiling pass
(`gpu_memory_utilization`, vLLM's knob) and replays decode steps from CUDA graphs.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from transformers import PretrainedConfig

from tandem.engine import cpu, cpu_kernels
from tandem.engine.attention import AttentionBackend, TorchAttention
from tandem.engine.config import ATTENTION_BACKENDS, EngineConfig
from tandem.engine.kernels.argmax import argmax_rows
from tandem.engine.loader import iter_safetensors, resolve_dtype
from tandem.engine.models import LlamaForCausalLM
from tandem.engine.models.llama import head_dim_of
from tandem.engine.sampler import Sampler, SampleResult
from tandem.engine.scheduler import ScheduledBatch
from tandem.engine.sequence import Sequence
from tandem.engine.step_inputs import StepInputs, StepUploader, build_step

log = logging.getLogger(__name__)

CPU_KV_CACHE_GB = 1.0


def kv_bytes_per_block(hf: PretrainedConfig, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * hf.num_hidden_layers * hf.num_key_value_heads * head_dim_of(hf)
    return per_token * block_size * dtype.itemsize


def kv_budget_bytes(total: int, free: int, peak: int, allocated: int, utilization: float) -> float:
    """Bytes for the KV cache: this engine's share of the device less its peak (weights and
    the largest step's activations), but never more than is free beside the activations it
    will need again, so other engines on the GPU (a prefill and a decode worker) keep theirs."""
    share = total * utilization - peak
    return max(0.0, min(share, free - (peak - allocated)))


def resolve_backend(name: str, device: torch.device) -> str:
    if name not in ATTENTION_BACKENDS:
        choices = ", ".join(ATTENTION_BACKENDS)
        raise ValueError(f"unknown attention backend {name!r}; choose {choices}")
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
        raise ValueError(
            "the triton attention backend runs on CUDA GPUs (on a CPU only under"
            " TRITON_INTERPRET=1, for tests); use --attention-backend torch"
        )
    return name


def profile_batch(tokens: int, longest: int, block_size: int) -> ScheduledBatch:
    """A prefill of `tokens` tokens in sequences of at most `longest` (the RoPE table's
    length), each with blocks of its own: what the scheduler makes when max_model_len is
    below the step's token budget."""
    seqs, sizes, first = [], [], 0
    for i, start in enumerate(range(0, tokens, longest)):
        size = min(longest, tokens - start)
        seq = Sequence(f"profile-{i}", 0, [0] * size, _greedy())
        blocks = -(-size // block_size)
        seq.block_table = list(range(first, first + blocks))
        first += blocks
        seqs.append(seq)
        sizes.append(size)
    return ScheduledBatch(seqs, sizes)


class ModelRunner:
    def __init__(self, config: EngineConfig, hf: PretrainedConfig, eos_token_ids: set[int]):
        self.config = config
        self.hf = hf
        self.device = torch.device(config.device)
        if self.device.type == "cuda":
            # cuBLASLt's heuristics beat cuBLAS's at decode batches above the skinny kernel's
            # 16 rows: 4.17 vs 4.43 ms of linears a step at batch 64 on an H200
            # (benchmarks/linear_shapes.py), 9,924 vs 9,598 tok/s at 64 concurrent
            # (engine_gpu.py). torch offers the choice process-wide only.
            torch.backends.cuda.preferred_blas_library("cublaslt")
        torch.manual_seed(config.seed)  # the noise of requests that bring no seed of their own
        self.dtype = resolve_dtype(config.dtype, hf, config.device)
        self.block_size = config.block_size
        self.backend_name = resolve_backend(config.attention_backend, self.device)
        max_positions = config.max_model_len or hf.max_position_embeddings
        with torch.device("meta"):
            model = LlamaForCausalLM(hf, None, max_positions)
        model = model.to_empty(device=self.device).to(self.dtype)
        model.init_rope()
        if config.load_format == "dummy":
            model.init_dummy_weights(config.seed)
        elif config.load_format == "auto":
            model.load_weights(iter_safetensors(config.model))
        else:
            raise ValueError(f"unknown load format {config.load_format!r}; choose auto, dummy")
        model.set_fused_kernels(self.backend_name == "triton")
        # (decode steps, prefills and logits): the CPU engine's thread counts
        self.cpu_threads: tuple[int, int] | None = None
        if self.device.type == "cpu":
            self.cpu_threads = cpu.thread_counts(config.cpu_threads)
            torch.set_num_threads(self.cpu_threads[0])
            if cpu.available():
                started = time.perf_counter()
                packed, few, total = model.pack_cpu_linears(cpu_kernels.load())
                log.info("CPU linears: %d of %d weights packed for oneDNN, %d taken by the C "
                         "linear at a few rows (faster so; %.1f s)",
                         packed, total, few, time.perf_counter() - started)  # fmt: skip
        self.model = model.eval()
        self.sampler = Sampler(eos_token_ids)
        self.uploader = StepUploader(self.device)
        self.graphs = None
        self.num_blocks = config.num_gpu_blocks or self._kv_blocks_for_memory()
        if self.num_blocks < 1:
            raise ValueError(
                "the KV cache holds no block: raise --kv-cache-memory, --num-gpu-blocks or "
                "--gpu-memory-utilization"
            )
        self.attention = self._make_backend(self.num_blocks)

    def start(self, max_model_len: int) -> None:
        """Once the engine knows its context limit: compile the attention kernels, capture
        the decode graphs."""
        on_gpu = self.device.type == "cuda" and self.backend_name == "triton"
        if on_gpu:
            started = time.perf_counter()
            self.attention.warm_up(self.hf.num_attention_heads, self.config.max_num_batched_tokens)
            self.model.warm_up_linears()
            log.info("Triton kernels ready in %.1f s", time.perf_counter() - started)
        if on_gpu and not self.config.enforce_eager:
            from tandem.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(
                self.model, self.attention, self.config.max_num_seqs, max_model_len
            )

    def _make_backend(self, num_blocks: int) -> AttentionBackend:
        shape = (
            self.hf.num_hidden_layers,
            num_blocks,
            self.block_size,
            self.hf.num_key_value_heads,
            head_dim_of(self.hf),
        )
        k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        scale = head_dim_of(self.hf) ** -0.5
        if self.backend_name == "triton":
            from tandem.engine.attention_triton import TritonAttention

            backend = TritonAttention(k_cache, v_cache, scale)
        else:
            backend = TorchAttention(k_cache, v_cache, scale)
            if cpu_kernels.glue_supports(backend.kernel, k_cache):
                self.model.set_cpu_kernels(backend.kernel)
        self.model.set_attention(backend)
        return backend

    def _kv_blocks_for_memory(self) -> int:
        per_block = kv_bytes_per_block(self.hf, self.block_size, self.dtype)
        if self.config.kv_cache_memory_gb is not None:
            return int(self.config.kv_cache_memory_gb * 2**30 // per_block)
        if self.device.type != "cuda":
            return int(CPU_KV_CACHE_GB * 2**30 // per_block)
        return self._profile_kv_blocks(per_block)

    def _profile_kv_blocks(self, per_block: int) -> int:
        """Run the largest prefill step the scheduler can make (its temporary KV blocks count
        as activations: a little conservative), then size the cache by `kv_budget_bytes`."""
        tokens = self.config.max_num_batched_tokens
        batch = profile_batch(tokens, self.model.rope.shape[0], self.block_size)
        self.attention = self._make_backend(sum(len(s.block_table) for s in batch.seqs))
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        step = build_step(batch, self.block_size)
        with torch.inference_mode():
            hidden = self._forward(step)
            rows = min(self.config.max_num_seqs, tokens)
            logits = self.model.compute_logits(hidden[-1:].expand(rows, -1))
            argmax_rows(torch.softmax(logits, dim=-1))  # compiles the sampler's kernels too
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del hidden, logits
        self.attention = None
        self.model.set_attention(None)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        allocated = torch.cuda.memory_allocated(self.device)
        budget = kv_budget_bytes(total, free, peak, allocated, self.config.gpu_memory_utilization)
        log.info(
            "GPU memory: %.1f GiB total, %.1f GiB free; peak %.1f GiB in a %d-token step"
            " (weights included): %.1f GiB for the KV cache",
            total / 2**30, free / 2**30, peak / 2**30, tokens, budget / 2**30,
        )
        return int(budget // per_block)

    def _forward(self, step: StepInputs, previous: Launched | None = None) -> torch.Tensor:
        """Hidden states of the step's sampled rows. Input tokens the previous step is still
        sampling are taken from its ids on the device."""
        dev = self.uploader.upload(step)
        if step.pending_rows:
            sampled = previous.token_ids.to(dev.input_ids.dtype)
            dev.input_ids[dev.pending_rows.long()] = sampled[dev.pending_src.long()]
        if self.graphs is not None and self.graphs.fits(step):
            hidden = self.graphs.run(step, dev)
            return hidden if len(step.sample_rows) == step.num_tokens else hidden[dev.sample_rows]
        self._cpu_threads(all_cores=step.num_tokens >= cpu.PREFILL_TOKENS)
        meta = self.attention.prepare(step, dev)
        hidden = self.model(dev.input_ids, dev.positions, meta)
        return hidden[dev.sample_rows]

    def _cpu_threads(self, all_cores: bool) -> None:
        if self.cpu_threads is not None:
            threads = self.cpu_threads[all_cores]
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)

    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], SampleResult | None]:
        """Compute the batch's tokens; sample for the sequences whose last token was computed."""
        launched = self.launch(batch)
        return launched.seqs, launched.result()

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, previous: Launched | None = None) -> Launched:
        """Queue the batch on the device and start copying its sampled ids back; `result()`
        waits for them. Logprobs need the host and are computed at once."""
        step = build_step(batch, self.block_size)
        hidden = self._forward(step, previous)
        seqs = step.sample_seqs
        if not seqs:
            return Launched([], None, None)
        self._cpu_threads(all_cores=True)
        logits = self.model.compute_logits(hidden)
        if any(s.sampling.logprobs is not None for s in seqs):
            return Launched(seqs, None, self.sampler(logits, seqs))
        return Launched(seqs, self.sampler.choose(logits, seqs), None)

    @torch.inference_mode()
    def all_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits of every token the batch computes (tests compare them with transformers)."""
        step = build_step(batch, self.block_size)
        step.sample_rows = list(range(step.num_tokens))
        dev = self.uploader.upload(step)
        hidden = self.model(dev.input_ids, dev.positions, self.attention.prepare(step, dev))
        return self.model.compute_logits(hidden)


class Launched:
    """A step on its way: the sequences it samples for and their ids, still on the device."""

    def __init__(
        self, seqs: list[Sequence], token_ids: torch.Tensor | None, done: SampleResult | None
    ) -> None:
        self.seqs = seqs
        self.token_ids = token_ids
        self._done = done
        self._host = None
        self._copied = None
        if token_ids is not None and token_ids.is_cuda:
            self._host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            self._host.copy_(token_ids, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()

    def result(self) -> SampleResult | None:
        if self._done is None and self.token_ids is not None:
            if self._copied is not None:
                self._copied.synchronize()  # waits with the GIL released
                ids = self._host.tolist()
            else:
                ids = self.token_ids.tolist()
            self._done = SampleResult(ids, [None] * len(ids))
        return self._done


def _greedy():
    from tandem.protocol import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0)
