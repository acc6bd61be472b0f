"""The demo model's linear shapes on this CPU: `F.linear` against oneDNN's pre-packed weights
(`tandem/engine/cpu.py`), per dtype and row count, on `--threads` threads, weights hot in
cache (a decode step streams them from memory: see engine_cpu.py for whole steps).

    python benchmarks/cpu_linears.py [--threads 1] [--rows 1 8 32 256]

Prints microseconds a call (best of a few) and the ratio; writes JSON. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# isort: off
import tandem  # noqa: F401 - first: its import sets OMP_WAIT_POLICY before torch loads
import torch
import torch.nn.functional as F

# isort: on
from tandem.engine import cpu

#: SmolLM2-135M: hidden 576, 9 query and 3 KV heads of 64, MLP 1536, vocabulary 49152.
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
          "logits": (49152, 576)}  # fmt: skip


def best_us(fn, x: torch.Tensor, calls: int) -> float:
    fn(x)
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 256])
    p.add_argument("--output", type=Path, default=Path("results/cpu_linears.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows_out = []
    for dtype in (torch.bfloat16, torch.float32):
        for rows in args.rows:
            for name, (n, k) in SHAPES.items():
                weight = torch.randn(n, k).to(dtype) * 0.02
                x = torch.randn(rows, k).to(dtype)
                packed = cpu.pack(weight)
                calls = 5 if name == "logits" else 30
                plain = best_us(lambda x: F.linear(x, weight), x, calls)  # noqa: B023
                fast = best_us(lambda x: cpu.packed_linear(x, packed, None), x, calls)  # noqa: B023
                same = torch.equal(F.linear(x, weight), cpu.packed_linear(x, packed, None))
                rows_out.append({"dtype": str(dtype)[6:], "rows": rows, "shape": name,
                                 "f_linear_us": plain, "packed_us": fast,
                                 "same_bits": same})  # fmt: skip
                print(f"{str(dtype)[6:]:>8} rows {rows:>4} {name:>8}: F.linear {plain:9.1f} us,"
                      f" packed {fast:9.1f} us, {plain / fast:4.2f}x, same bits {same}",
                      flush=True)  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"threads": args.threads, "rows": rows_out}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
