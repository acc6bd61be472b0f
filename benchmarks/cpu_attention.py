"""CPU decode attention: the C kernel (`tandem/engine/cpu_attention.c`) against torch's padded
SDPA path it replaced, on the demo model's attention shape (9 query heads, 3 KV heads of 64),
blocks of 16 scattered over the cache, one layer. The two alternate call by call; medians.

    python benchmarks/cpu_attention.py [--threads 1] [--output results/cpu_attention.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tandem.engine import cpu_kernels
from tandem.engine.attention import AttentionMetadata, TorchAttention

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16
CASES = [(1, 192), (8, 192), (32, 192), (32, 512), (64, 512), (1, 8192)]


def make(num_seqs: int, context: int, dtype: torch.dtype):
    width = -(-context // BLOCK)
    blocks = num_seqs * width + 1
    k_cache = torch.randn(blocks, BLOCK, KV_HEADS, DIM).to(dtype)
    v_cache = torch.randn(blocks, BLOCK, KV_HEADS, DIM).to(dtype)
    tables = (torch.randperm(blocks - 1)[: num_seqs * width] + 1).view(num_seqs, width)
    lens = torch.full((num_seqs,), context, dtype=torch.int32)
    q = torch.randn(num_seqs, HEADS, DIM).to(dtype)
    rows = torch.arange(num_seqs, dtype=torch.int32)
    meta = AttentionMetadata(torch.zeros(0), [], rows, tables.int(), lens, context, None)
    return q, k_cache, v_cache, meta


def time_case(lib, num_seqs: int, context: int, dtype: torch.dtype, repeats: int):
    """Median ms of the padded path and of the kernel, alternating call by call."""
    q, k_cache, v_cache, meta = make(num_seqs, context, dtype)
    backend = TorchAttention(k_cache[None], v_cache[None], DIM**-0.5)
    out = torch.empty_like(q)

    def padded():
        meta.decode_mask = None  # as in a step without the kernel: the mask is built per step
        backend.padded_decode(q, k_cache, v_cache, out, meta)

    def kernel():
        cpu_kernels.decode_attention(lib, q, k_cache, v_cache, out, meta.decode_rows,
                                       meta.decode_blocks, meta.decode_lens, DIM**-0.5)  # fmt: skip

    times: dict[str, list[float]] = {"padded": [], "kernel": []}
    for _ in range(repeats):
        for name, fn in (("padded", padded), ("kernel", kernel)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return [statistics.median(times[n]) * 1e3 for n in ("padded", "kernel")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", default="results/cpu_attention.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lib = cpu_kernels.library()
    rows = []
    print(f"{'dtype':<9} {'seqs':>4} {'context':>7} {'padded SDPA ms':>14} {'kernel ms':>9} "
          f"{'ratio':>6}")  # fmt: skip
    for dtype in (torch.bfloat16, torch.float32):
        for num_seqs, context in CASES:
            p, k = time_case(lib, num_seqs, context, dtype, args.repeats)
            rows.append({"dtype": str(dtype), "seqs": num_seqs, "context": context,
                         "padded_ms": p, "kernel_ms": k, "ratio": p / k})  # fmt: skip
            name = str(dtype).removeprefix("torch.")
            print(f"{name:<9} {num_seqs:>4} {context:>7} {p:>14.3f} {k:>9.3f} {p / k:>5.1f}x")
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
