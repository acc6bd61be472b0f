"""The 8B model's linears at decode batch sizes, timed under each BLAS library torch offers.

At small batches a linear layer is a read of its weight, so its time against the copy
bandwidth says how much of a decode step the GEMM library leaves on the table. Each shape is
timed inside a CUDA graph (as the engine replays decode), over four weight copies in turn so
that no weight sits in L2 between calls.

    python benchmarks/linear_shapes.py                 # on a GPU, ~30 s
    python benchmarks/linear_shapes.py --batch 1 64 --blas cublas cublaslt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SHAPES = {  # name: (out_features, in_features), Llama-3.1-8B with fused QKV and gate/up
    "qkv": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}


def time_linear(m: int, n: int, k: int, copies: int = 4, calls: int = 20) -> float:
    """Seconds per call of F.linear on [m, k] x [n, k]^T, replayed from one CUDA graph."""
    weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    outs = [torch.empty(m, n, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]

    def body() -> None:
        for i in range(calls):
            torch.matmul(x, weights[i % copies].t(), out=outs[i % copies])

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        body()  # the library picks and loads its kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / calls)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--blas", nargs="+", default=["cublas", "cublaslt"])
    p.add_argument("--output", type=Path, default=Path("results/linear_shapes.json"))
    args = p.parse_args()
    rows = []
    for m in args.batch:
        for name, (n, k) in SHAPES.items():
            row = {"batch": m, "linear": name, "n": n, "k": k}
            for lib in args.blas:
                torch.backends.cuda.preferred_blas_library(lib)
                seconds = time_linear(m, n, k)
                row[f"{lib}_us"] = round(seconds * 1e6, 2)
                row[f"{lib}_GBps"] = round((n * k + m * k + m * n) * 2 / seconds / 1e9)
            rows.append(row)
            print("  ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    for m in args.batch:
        for lib in args.blas:
            total = sum(r[f"{lib}_us"] * (1 if r["linear"] == "lm_head" else 32) for r in rows
                        if r["batch"] == m)  # fmt: skip
            print(f"batch {m} {lib}: {total / 1e3:.3f} ms of linears a step")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
