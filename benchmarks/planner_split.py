"""The planner's prefill:decode split against two aggregated workers and 1 prefill + 1 decode,
in goodput per worker, on the chat workload of benchmarks/disagg_goodput.py.

At each rate the split is what the planner's replica calculator (`tandem.planner`) asks for
on the mock's own step times (`PerfModelSteps`: the model an operator's profile would give)
and the workload's lengths, for the same targets the goodput is judged by. Each fleet then
serves the same Poisson arrivals (the real scheduler and block manager in mock workers, KV
moved over the TCP request plane), one fleet at a time; per fleet: the SLO attainment,
goodput (offered rate x attainment) and goodput per worker. Prints a table, writes JSON,
asserts nothing.

    python benchmarks/planner_split.py                 # 24 and 32 req/s, ~10 min on 2 cores
    python benchmarks/planner_split.py --chat-rates 24 --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from pathlib import Path

import disagg_goodput as dg
from kv_transfer import BLOCK, GEOMETRIES

from tandem.bench.workloads import LengthDist
from tandem.engine.mock.perf_model import PolynomialPerfModel
from tandem.planner import PoolBounds, decode_replicas, prefill_replicas


class PerfModelSteps:
    """The mock's own performance model behind the step model's two questions."""

    def __init__(self, kv_tokens: int) -> None:
        self.perf, self.kv_tokens = PolynomialPerfModel(), kv_tokens

    def prefill_s(self, tokens: float) -> float:
        return self.perf.prefill_ms(int(tokens)) / 1e3

    def decode_s(self, batch: float, context_tokens: float) -> float:
        usage = min(1.0, context_tokens / self.kv_tokens)
        return self.perf.decode_ms(int(batch), int(context_tokens), usage) / 1e3


def planned_roles(rate: float, input_len: str, output_len: str, ttft_s: float, itl_s: float,
                  kv_tokens: int, most: int = 16) -> list[str]:  # fmt: skip
    """The calculator's pools for `rate` requests/s of these lengths, as worker roles."""
    rng = random.Random(1)
    prompts = [LengthDist.parse(input_len).sample(rng) for _ in range(2000)]
    outputs = [LengthDist.parse(output_len).sample(rng) for _ in range(2000)]
    model, bounds = PerfModelSteps(kv_tokens), PoolBounds(1, most)
    p = prefill_replicas(model, rate, prompts, ttft_s, bounds)
    d = decode_replicas(model, rate, prompts, outputs, itl_s, kv_tokens, bounds)
    return ["prefill"] * p + ["decode"] * d


async def run(args: argparse.Namespace, model: Path) -> list[dict]:
    workload = dg.Workload("chat", args.chat_input, args.chat_output, args.chat_rates)
    rows = []
    for rate in workload.rates:
        planned = planned_roles(rate, args.chat_input, args.chat_output, args.ttft_slo_ms / 1e3,
                                args.itl_slo_ms / 1e3, args.blocks * BLOCK)  # fmt: skip
        fleets = {**dg.ROLES, "planner": planned}
        for mode, roles in fleets.items():
            row = await dg.run_point(model, mode, workload, rate, args, roles)
            rows.append(row)
            print(f"  {rate:g} req/s {mode} ({roles.count('prefill')}P {roles.count('decode')}D"
                  f" {roles.count('aggregated')}A): {row['good_fraction']:.0%} met the SLOs,"
                  f" goodput {row['goodput']:.2f}/s, {row['goodput_per_worker']:.2f}/s a worker",
                  flush=True)  # fmt: skip
    return rows


def report(rows: list[dict]) -> list[str]:
    print(f"\n{'req/s':>5} {'fleet':>13} {'workers':>8} {'SLO met':>7} {'goodput':>8}"
          f" {'per worker':>10} {'TTFT p99':>9} {'TPOT p50':>8}")  # fmt: skip
    verdicts = []
    for rate in sorted({r["rate"] for r in rows}):
        mine = {r["mode"]: r for r in rows if r["rate"] == rate}
        for r in mine.values():
            split = f"{r['roles'].count('prefill')}P+{r['roles'].count('decode')}D" if (
                "prefill" in r["roles"]) else f"{len(r['roles'])}A"  # fmt: skip
            print(f"{rate:>5g} {r['mode']:>13} {split:>8} {r['good_fraction']:>7.0%}"
                  f" {r['goodput']:>8.2f} {r['goodput_per_worker']:>10.2f}"
                  f" {r['ttft_p99_ms']:>9.0f} {r['tpot_p50_ms']:>8.1f}")  # fmt: skip
        best = max(mine["aggregated"]["goodput_per_worker"],
                   mine["disaggregated"]["goodput_per_worker"])  # fmt: skip
        ratio = mine["planner"]["goodput_per_worker"] / best if best > 0 else float("inf")
        verdicts.append(f"{rate:g} req/s: the planner's split gives {ratio:.2f}x the goodput"
                        " per worker of the better of 2 aggregated and 1P+1D")  # fmt: skip
    for line in verdicts:
        print(line)
    return verdicts


def main() -> None:
    p = dg.parser(__doc__)
    p.set_defaults(chat_rates=[24.0, 32.0], output=Path("results/planner_split.json"))
    args = p.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = dg.write_mock_model(Path(tmp) / "mock", GEOMETRIES[args.mock_geometry],
                                    args.max_model_len)  # fmt: skip
        rows = asyncio.run(run(args, model))
    result = {"args": vars(args), "rows": rows, "verdicts": report(rows),
              "runtime_s": time.perf_counter() - started}  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str))
    print(f"\ntotal {result['runtime_s']:.0f} s; wrote {args.output}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
