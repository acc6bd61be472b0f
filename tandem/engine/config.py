"""Engine configuration: what a user sets with `tandem serve` flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ATTENTION_BACKENDS = ("auto", "triton", "torch")


@dataclass
class EngineConfig:
    """Settings of one engine instance. Names follow vLLM's flags.

    `model` is a Hugging Face model folder (config.json, safetensors, tokenizer files);
    `.gguf` files are converted into such a folder before the engine sees them.
    KV capacity is `num_gpu_blocks` when given, else what `kv_cache_memory_gb` holds, else
    (on a GPU) `gpu_memory_utilization` of the device's memory less what the model and a
    profiling pass at the largest batch take; 1 GiB on a CPU.
    """

    model: str
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "cpu"  # cpu | cuda
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    num_gpu_blocks: int | None = None
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    # KV tiers under the device pool (tandem.kvbm): host memory and a disk folder, in GiB
    # (0: off). Evicted prefix blocks go down; prefix hits there are loaded back.
    kv_offloading_size: float = 0.0
    kv_disk_path: str | None = None
    kv_disk_size: float = 0.0
    # Disaggregation: seconds a prefill worker holds exported KV for a decode worker to pull.
    kv_export_ttl: float = 30.0
    #: How prefill and decode workers move KV blocks (tandem.worker.kv_transport); the
    #: engine itself does not read it.
    kv_transport: str = "auto"
    seed: int = 0
    # GPU execution: attention kernels (auto: triton on CUDA, torch on CPU) and CUDA graphs
    # for decode steps (enforce_eager turns them off).
    attention_backend: str = "auto"  # auto | triton | flashinfer | fa3 | torch
    enforce_eager: bool = False
    # Queue each step before reading the previous step's tokens (host work overlaps the GPU);
    # None: on with a GPU, where it measured 1.08-1.14x faster decode, off on CPU.
    async_scheduling: bool | None = None
    load_format: str = "auto"  # auto: the folder's safetensors; dummy: random weights
    # CPU: threads for the model's matmuls (None: this process's cores but one, at least 1).
    cpu_threads: int | None = None
    max_logprobs: int = 20
    # The mock engine: no weights, step times from a performance model (tandem.engine.mock).
    engine: str = "real"  # real | mock | vllm (vLLM's AsyncLLM behind the same contract)
    vllm_args: dict[str, Any] = field(default_factory=dict)  # more AsyncEngineArgs, for vllm
    perf_model: str | None = None  # "polynomial" (default) or a profile JSON from `tandem profile`
    mock_speedup: float = 1.0  # divides every modelled step time
    mock_transfer_gbps: float = 25.0  # the modelled KV transfer link, GB/s
    mock_host_gbps: float = 25.0  # the modelled host KV tier's copies (pinned PCIe), GB/s
    mock_disk_gbps: float = 3.0  # the modelled disk KV tier's reads (one NVMe), GB/s
