"""engine_gpu.py's measuring tools and baselines: small helpers, the GPU's ceilings (copy
bandwidth, bf16 matmul peak) and Hugging Face `generate`."""

import gc
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

# isort: off
import tandem  # noqa: F401 - first: its import sets OMP_WAIT_POLICY before torch loads
import torch

# isort: on
from tandem.bench.dummy_model import (
    num_parameters,
)

# -- small helpers ------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def make_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """`count` distinct random prompts (ids below the special tokens), reproducible by seed."""
    g = torch.Generator().manual_seed(seed)
    high = vocab - 256 if vocab > 1024 else vocab - 3
    return [torch.randint(10, high, (length,), generator=g).tolist() for _ in range(count)]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- 1. the GPU's ceilings -----------------------------------------------------------------


def timed(fn, device: torch.device) -> float:
    """Seconds that `fn()` takes on `device` (CUDA events on a GPU)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def copy_bandwidth(device: torch.device, gib: float, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy (read + written), best of `repeats`."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(partial(dst.copy_, src), device) for _ in range(repeats))
    del src, dst
    free_memory(device)
    return 2 * n * 2 / best


def _matmuls(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, count: int) -> None:
    for _ in range(count):
        torch.matmul(a, b, out=out)


def matmul_peak(device: torch.device, size: int, dtype: torch.dtype, iters: int = 10) -> float:
    """FLOP/s of a size^3 matmul in `dtype`: mean of `iters` back-to-back after a warm-up."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    _matmuls(a, b, out, 3)
    elapsed = timed(partial(_matmuls, a, b, out, iters), device) / iters
    del a, b, out
    free_memory(device)
    return 2 * size**3 / elapsed


def prefill_flops(config: dict[str, Any], tokens: int) -> dict[str, float]:
    """FLOPs of one prompt's prefill: the layers' matmuls on every token, lm_head on the last
    one only (the engine computes logits for sampled rows), causal attention (QK^T and PV)."""
    params = num_parameters(config)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    linear = 2 * params["layers"] * tokens + 2 * (params["lm_head"] or params["embedding"])
    attention = 2 * config["num_hidden_layers"] * heads * head_dim * tokens * tokens
    return {"linear": float(linear), "attention": float(attention), "total": linear + attention}


# -- 2. Hugging Face generate -------------------------------------------------------------


def run_hf(
    folder: Path, device: torch.device, dtype: torch.dtype, workloads: dict[str, Any]
) -> dict[str, Any]:
    """Greedy `generate` throughput (output tokens / wall time) of each workload, once each
    after a short warm-up. `workloads` maps a name to (prompts, max_new_tokens)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    started = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    build_s = time.perf_counter() - started
    log(f"hf: model built in {build_s:.1f} s")
    pad = config.eos_token_id

    def generate(model, prompts: list[list[int]], new: int) -> tuple[int, float]:
        ids = torch.tensor(prompts, device=device)
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=pad,
            )
        synchronize(device)
        elapsed = time.perf_counter() - start
        return (out.shape[1] - ids.shape[1]) * ids.shape[0], elapsed

    results: dict[str, Any] = {"build_s": build_s}
    try:
        for name, (prompts, new) in workloads.items():
            generate(model, prompts, min(8, new))  # warm-up: kernels, allocator, caches
            tokens, elapsed = generate(model, prompts, new)
            if tokens != len(prompts) * new:
                raise RuntimeError(f"hf {name}: {tokens} tokens, expected {len(prompts) * new}")
            results[name] = {"tokens": tokens, "elapsed_s": elapsed, "tok_s": tokens / elapsed}
            log(f"hf {name}: {tokens / elapsed:,.1f} output tok/s ({elapsed:.2f} s)")
    finally:
        del model
        free_memory(device)
    return results
