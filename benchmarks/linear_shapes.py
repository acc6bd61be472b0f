"""The 8B model's linears at decode batch sizes, timed under each BLAS library torch offers.

At small batches a linear layer is a read of its weight, so its time against the copy
bandwidth says how much of a decode step the GEMM library leaves on the table. Each shape is
timed inside a CUDA graph (as the engine replays decode), over four weight copies in turn so
that no weight sits in L2 between calls.

    python benchmarks/linear_shapes.py                 # on a GPU, ~30 s
    python benchmarks/linear_shapes.py --batch 1 64 --blas cublas cublaslt

At batches up to 64 it also times Tandem's skinny Triton linear
(`tandem.engine.kernels.skinny_linear`) with the tiles the engine picks; `--sweep` tries
others and reports the best per shape; `--gated` times gate_up + SiLU unfused against the
one gated launch the MLP makes, and sweeps its tiles.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tandem.engine.kernels.skinny_linear import (
    TILE_ROWS,
    gated_config,
    skinny_linear,
    tile_config,
)

SHAPES = {  # name: (out_features, in_features), Llama-3.1-8B with fused QKV and gate/up
    "qkv": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}


#: (block_n, block_k, num_warps, num_stages) tried for the skinny Triton linear.
SKINNY_CONFIGS = [
    (bn, bk, w, st)
    for bn in (16, 32, 64)
    for bk in (128, 256, 512)
    for w in (4, 8)
    for st in (3, 5)
    if bn * bk <= 16384
]
#: Tiles tried at 32-64 rows, where x's tile is as large as the weight's.
WIDE_CONFIGS = [
    (bn, bk, w, st)
    for bn in (16, 32, 64, 128)
    for bk in (64, 128, 256)
    for w in (4, 8)
    for st in (3, 4, 5, 6)
    if bn * bk <= 16384 and (64 + bn) * bk * 2 * st <= 200 * 1024
]


#: Split-K tiles tried for the narrow layers (o_proj, down) at 32-64 rows.
SPLIT_CONFIGS = [
    (bn, bk, 4, st) for bn in (16, 32, 64) for bk in (64, 128, 256) for st in (3, 4, 5, 6)
    if (64 + bn) * bk * 2 * st <= 200 * 1024
]  # fmt: skip


#: Gated tiles (each program reads 2 x block_n weight rows).
GATED_CONFIGS = [
    (bn, bk, w, st) for bn in (16, 32, 64) for bk in (64, 128, 256) for w in (4, 8)
    for st in (3, 4, 5) if (64 + 2 * bn) * bk * 2 * st <= 220 * 1024
]  # fmt: skip


def time_linear(
    m: int, n: int, k: int, copies: int = 4, calls: int = 20, skinny: tuple | None = None,
    splits: int = 1, summed: bool = False,
) -> float:
    """Seconds per call of [m, k] x [n, k]^T (torch.matmul, or the skinny Triton kernel with
    config `skinny` and K cut in `splits`, the parts `summed` in the launch or left as
    they are), replayed from one CUDA graph."""
    weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    parted = splits > 1 and not summed
    shape, dtype = ((splits, m, n), torch.float32) if parted else ((m, n), torch.bfloat16)
    outs = [torch.empty(shape, dtype=dtype, device="cuda") for _ in range(copies)]
    if skinny is not None:
        got = skinny_linear(x, weights[0], config=skinny, splits=splits, summed=summed)
        got = got.sum(0).to(x.dtype) if parted else got
        want = torch.matmul(x, weights[0].t())
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-1)

    def body() -> None:
        for i in range(calls):
            if skinny is None:
                torch.matmul(x, weights[i % copies].t(), out=outs[i % copies])
            else:
                skinny_linear(x, weights[i % copies], outs[i % copies], config=skinny,
                              splits=splits, summed=summed)

    return graph_seconds(body) / calls


def graph_seconds(body) -> float:
    """Best of 5 replays of `body` captured in one CUDA graph."""
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
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def time_gated(m: int, config: tuple | None, copies: int = 4, calls: int = 20) -> float:
    """Seconds per gate_up + SiLU at m rows: cuBLAS then the SiLU kernel (`config` None), or
    one gated skinny launch with tile `config`."""
    from tandem.engine.kernels.fused import silu_and_mul

    n, k = SHAPES["gate_up"]
    weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k**0.5
               for _ in range(copies)]  # fmt: skip
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    outs = [torch.empty(m, n // 2, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
    if config is not None:
        want = silu_and_mul(x @ weights[0].t())
        got = skinny_linear(x, weights[0], config=config, gated=True)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)

    def body() -> None:
        for i in range(calls):
            if config is None:
                outs[i % copies].copy_(silu_and_mul(x @ weights[i % copies].t()))
            else:
                skinny_linear(x, weights[i % copies], outs[i % copies], config=config,
                              gated=True)

    return graph_seconds(body) / calls


def gated_rows(batches: list[int]) -> list[dict]:
    """gate_up + SiLU, unfused (cuBLAS; the copy into place is counted too) against the
    gated launch at the engine's tile and the best of `GATED_CONFIGS`."""
    from triton.runtime.errors import OutOfResources

    rows = []
    for m in [b for b in batches if b <= TILE_ROWS]:
        row = {"batch": m, "linear": "gate_up+silu",
               "unfused_us": round(time_gated(m, None) * 1e6, 2),
               "gated_us": round(time_gated(m, gated_config(m)) * 1e6, 2)}  # fmt: skip
        best = (float("inf"), None)
        for config in GATED_CONFIGS:
            try:
                best = min(best, (time_gated(m, config), config))
            except OutOfResources:
                continue
        row["gated_best_us"], row["gated_best_config"] = round(best[0] * 1e6, 2), best[1]
        rows.append(row)
        print("  ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    return rows


def timed_skinny(
    m: int, n: int, k: int, config: tuple, splits: int = 1, summed: bool = False
) -> tuple[float, tuple]:
    """(seconds, config); a config over the shared-memory limit times as infinity."""
    from triton.runtime.errors import OutOfResources

    try:
        return time_linear(m, n, k, skinny=config, splits=splits, summed=summed), config
    except OutOfResources:
        return float("inf"), config


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--blas", nargs="+", default=["cublas", "cublaslt"])
    p.add_argument("--sweep", action="store_true",
                   help="also sweep the skinny kernel's tile shapes")
    p.add_argument("--splits", type=int, nargs="*", default=[],
                   help="sweep split-K tiles (K cut in so many) of o_proj, down (partial sums)"
                   " and qkv (summed in the launch) at > 16 rows")
    p.add_argument("--gated", action="store_true",
                   help="only gate_up + SiLU: unfused against the gated launch, with a sweep")
    p.add_argument("--no-skinny", dest="skinny", action="store_false",
                   help="skip the skinny Triton linear's sweep")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES),
                   help="only these linears (default: all)")  # fmt: skip
    p.add_argument("--output", type=Path, default=Path("results/linear_shapes.json"))
    args = p.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.gated:
        args.output.write_text(json.dumps(gated_rows(args.batch), indent=2))
        return 0
    rows = []
    for m in args.batch:
        for name, (n, k) in [(name, SHAPES[name]) for name in args.shapes]:
            row = {"batch": m, "linear": name, "n": n, "k": k}
            for lib in args.blas:
                torch.backends.cuda.preferred_blas_library(lib)
                seconds = time_linear(m, n, k)
                row[f"{lib}_us"] = round(seconds * 1e6, 2)
                row[f"{lib}_GBps"] = round((n * k + m * k + m * n) * 2 / seconds / 1e9)
            if args.skinny and m <= TILE_ROWS:
                seconds, _ = timed_skinny(m, n, k, tile_config(n, k))  # the engine's
                row["triton_us"] = round(seconds * 1e6, 2)
                row["triton_GBps"] = round((n * k + m * k + m * n) * 2 / seconds / 1e9)
                if args.sweep:
                    configs = SKINNY_CONFIGS if m <= 16 else WIDE_CONFIGS
                    best = min(timed_skinny(m, n, k, c) for c in configs)
                    row["triton_best_us"] = round(best[0] * 1e6, 2)
                    row["triton_best_config"] = list(best[1])
                if args.splits and m > 16 and n < 16384:  # qkv: the parts summed in-launch
                    best = min((timed_skinny(m, n, k, c, s, summed=n > k)[0], (*c, s))
                               for c in SPLIT_CONFIGS for s in args.splits)  # fmt: skip
                    row["triton_split_us"] = round(best[0] * 1e6, 2)
                    row["triton_split_config"] = list(best[1])
            rows.append(row)
            print("  ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    for m in args.batch:
        libs = [*args.blas, *(["triton"] if args.skinny and m <= TILE_ROWS else []),
                *(["triton_best"] if args.sweep and args.skinny and m <= TILE_ROWS else [])]
        for lib in libs:
            total = sum(r[f"{lib}_us"] * (1 if r["linear"] == "lm_head" else 32) for r in rows
                        if r["batch"] == m)  # fmt: skip
            print(f"batch {m} {lib}: {total / 1e3:.3f} ms of linears a step")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
