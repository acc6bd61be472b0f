"""Disaggregated serving: what splitting prefill from decode buys.

Two GPUs' worth of mock workers (`engine="mock"`: the real scheduler and block manager, step
times from the polynomial performance model, KV transfers modelled as 1 ms + bytes /
`--transfer-gbps`) served either as 2 aggregated workers or as 1 prefill + 1 decode worker,
behind the frontend's `RemoteEngine` on a real TCP request plane (only HTTP is left out; every
request goes through the prefill worker unless `--local-prefill`). The mock model has
Llama-3.1-8B's KV geometry (128 KiB per token), so a transfer is as large as for that model.
Open-loop Poisson arrivals at a sweep of rates, the same arrivals and prompts for both fleets;
two workloads of random token ids, no shared prefixes: `long` (8,000-token prompts, 50-token
answers) and `chat` (uniform 500-2,500-token prompts, uniform 100-300-token answers). Per rate:
TTFT p50/p99, ITL p50/p99 (every gap pooled), TPOT p50 (a request's mean ITL), output tokens/s,
the fraction of requests that met both SLOs (TTFT <= `--ttft-slo-ms`, the request's ITL
statistic `--itl-slo-stat` (mean) <= `--itl-slo-ms`; failed and cancelled requests miss),
goodput = offered rate x that fraction, and the disaggregated / aggregated goodput ratio; then
one line per workload saying where disaggregation wins and loses, and which SLO the losing side
missed. `--mock-speedup` divides every modelled time so that the sweep finishes sooner;
latencies and rates are reported in model time (wall time x speedup), as the modelled GPUs
would see them. This machine's Python overhead is multiplied by the speedup too (about +5% on
latencies at 2 against 1), so keep it low.

What moving the KV cache really costs (between two processes, host/TCP and CUDA IPC) is
measured by benchmarks/kv_transfer.py, whose KV geometries this script shares.

Timings are printed and written to `--output` (default results/disagg_goodput.json); nothing
is asserted.

    python benchmarks/disagg_goodput.py                  # ~3-4 min on 2 cores
    python benchmarks/disagg_goodput.py --workloads chat --chat-rates 4 8 16 \\
        --requests 100 --mock-speedup 1 --ttft-slo-ms 500 --itl-slo-ms 25 --itl-slo-stat p90
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

# A sibling script, importable because `python benchmarks/disagg_goodput.py` puts benchmarks/
# first on sys.path: the KV geometries and block size live there, once.
from kv_transfer import BLOCK, GEOMETRIES, Geometry

from tandem.bench.engine_client import engine_sender
from tandem.bench.runner import Arrival, Bounds, RunResult, run_load
from tandem.bench.stats import ITL_STATS, Slo, goodput, itl_stat, summarize
from tandem.bench.tokens import TokenSpace
from tandem.bench.workloads import LengthDist, SyntheticWorkload
from tandem.deploy import LocalCluster
from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.frontend.disagg import DisaggConfig

VOCAB = 128256  # the mock model's (Llama 3's)


def write_mock_model(path: Path, geometry: Geometry, max_len: int) -> Path:
    """A config.json of a Llama with `geometry`'s KV shape (no weights: the mock needs none)."""
    path.mkdir(parents=True, exist_ok=True)
    heads = 32
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": heads * geometry.head_dim,
        "intermediate_size": 14336,
        "num_hidden_layers": geometry.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": geometry.kv_heads,
        "head_dim": geometry.head_dim,
        "vocab_size": VOCAB,
        "max_position_embeddings": max_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": geometry.dtype,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


#: The two fleets compared here: two GPUs as two aggregated workers, or one of each role.
ROLES = {"aggregated": ["aggregated"] * 2, "disaggregated": ["prefill", "decode"]}


class Fleet:
    """Mock workers of the given roles, each with its own engine and TCP request server, and
    the frontend's RemoteEngine over them: aggregated workers (KV-aware routing), or prefill
    and decode workers (every request is prefilled on a prefill worker and its KV pulled over
    TCP by a decode worker)."""

    def __init__(self, model: Path, roles: list[str], args: argparse.Namespace) -> None:
        self.engines = [self._engine(model, args) for _ in roles]
        planner = DisaggConfig(max_local_prefill_length=0, max_prefill_queue_tokens=1 << 60)
        if args.local_prefill:
            planner = DisaggConfig()
        self.cluster = LocalCluster(self.engines, roles, served="mock", transport="tcp",
                                    lease_ttl=10.0, publish_interval=0.05 / args.mock_speedup,
                                    policy="kv", disagg=planner)  # fmt: skip
        self.remote = self.cluster.remote

    @staticmethod
    def _engine(model: Path, args: argparse.Namespace) -> AsyncEngine:
        return AsyncEngine(
            EngineConfig(
                model=str(model),
                engine="mock",
                dtype="bfloat16",  # "auto" would pick float32 on most CPUs: twice the bytes
                num_gpu_blocks=args.blocks,
                max_num_seqs=args.max_num_seqs,
                block_size=BLOCK,
                mock_speedup=args.mock_speedup,
                mock_transfer_gbps=args.transfer_gbps,
            )
        )

    async def __aenter__(self) -> Fleet:
        await self.cluster.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cluster.stop(grace=1.0)
        for engine in self.engines:
            engine.shutdown()

    def counters(self) -> dict:
        stats = [e.stats() for e in self.engines]
        return {
            "paths": dict(self.remote.planner.counts),
            "kv_imports": sum(s.kv_imports for s in stats),
            "kv_import_fallbacks": sum(s.kv_import_fallbacks for s in stats),
            "kv_exports_expired": sum(s.kv_exports_expired for s in stats),
            "busy_s": sum(e.core.runner.busy_s for e in self.engines),
        }


class Workload(NamedTuple):
    name: str
    input_len: str
    output_len: str
    rates: list[float]  # requests/s in model time


async def run_point(
    model: Path, mode: str, workload: Workload, rate: float, args: argparse.Namespace,
    roles: list[str] | None = None,
) -> dict:
    """One fresh fleet (`roles`, by default the mode's), `--requests` Poisson arrivals at
    `rate` (model time)."""
    roles = roles or ROLES[mode]
    load = SyntheticWorkload(
        LengthDist.parse(workload.input_len),
        LengthDist.parse(workload.output_len),
        TokenSpace.for_vocab(VOCAB),
        seed=args.seed,
    )
    # The same seeds in both modes: the same prompts arrive at the same moments.
    arrival = Arrival("poisson", rate=rate * args.mock_speedup, seed=args.seed)
    bounds = Bounds(duration_s=args.max_seconds, num_requests=args.requests)
    async with Fleet(model, roles, args) as fleet:
        before = fleet.counters()
        result = await run_load(load, engine_sender(fleet.remote.generate), arrival, bounds)
        after = fleet.counters()
    row = {"workload": workload.name, "mode": mode, "rate": rate, "roles": roles}
    row.update(measured(result, args))
    row["busy_fraction"] = (after["busy_s"] - before["busy_s"]) / (result.elapsed_s * len(roles))
    row["paths"] = {k: v - before["paths"].get(k, 0) for k, v in after["paths"].items()}
    for key in ("kv_imports", "kv_import_fallbacks", "kv_exports_expired"):
        row[key] = after[key] - before[key]
    row["goodput"] = rate * row["good_fraction"]
    row["goodput_per_worker"] = row["goodput"] / len(roles)
    return row


def measured(result: RunResult, args: argparse.Namespace) -> dict:
    """Latencies (ms) and rates (per s) of a run, in model time, and who met the SLOs.

    The good fraction counts every request sent (cancelled at the time bound: missed); goodput
    is the offered rate times it. Good requests over the run's wall time (also kept) would
    mostly measure how long the last requests took to drain, in runs this short."""
    speed = args.mock_speedup
    slo = Slo(
        ttft_s=args.ttft_slo_ms / 1e3 / speed,
        itl_s=args.itl_slo_ms / 1e3 / speed,
        itl_stat=args.itl_slo_stat,
    )
    records = result.records
    summary = summarize(records, result.elapsed_s, slo)
    good, _ = goodput(records, slo, result.elapsed_s)
    ok = [r for r in records if r.ok and r.ttft_s is not None]
    itls = [itl_stat(r, slo.itl_stat) for r in ok]

    def ms(stats: dict, key: str) -> float:
        return stats.get(key, math.nan) * speed

    return {
        "completed": summary["requests"]["completed"],
        "failed": summary["requests"]["failed"],
        "cancelled": summary["requests"]["cancelled"],
        "errors": summary["requests"]["errors"],
        "first_error": next((r.error_detail for r in records if r.error), None),
        "elapsed_s": result.elapsed_s * speed,
        "ttft_p50_ms": ms(summary["ttft_ms"], "p50"),
        "ttft_p99_ms": ms(summary["ttft_ms"], "p99"),
        "itl_p50_ms": ms(summary["itl_ms"], "p50"),
        "itl_p99_ms": ms(summary["itl_ms"], "p99"),
        "tpot_p50_ms": ms(summary["tpot_ms"], "p50"),
        "request_throughput": summary["request_throughput"] / speed,
        "output_tok_s": summary["output_token_throughput"] / speed,
        "good_fraction": good / len(records),
        "goodput_over_wall": summary["goodput"]["requests_per_s"] / speed,
        "missed_ttft": sum(r.ttft_s > slo.ttft_s for r in ok),
        "missed_itl": sum(x is not None and x > slo.itl_s for x in itls),
    }


def workloads(args: argparse.Namespace) -> list[Workload]:
    return [
        Workload("long", args.long_input, args.long_output, args.long_rates),
        Workload("chat", args.chat_input, args.chat_output, args.chat_rates),
    ]


async def goodput_async(args: argparse.Namespace, model: Path) -> list[dict]:
    rows = []
    for workload in workloads(args):
        if workload.name not in args.workloads:
            continue
        for rate in workload.rates:
            for mode in ("aggregated", "disaggregated"):
                row = await run_point(model, mode, workload, rate, args)
                rows.append(row)
                print(
                    f"  {workload.name} {rate:g} req/s {mode}: {row['completed']} done,"
                    f" goodput {row['goodput']:.2f} req/s",
                    flush=True,
                )
    return rows


def goodput_part(args: argparse.Namespace) -> dict:
    geometry = GEOMETRIES[args.mock_geometry]
    print(
        f"\nGoodput: 2 aggregated vs 1 prefill + 1 decode mock workers, {args.mock_geometry}"
        f" KV geometry ({geometry.layout().block_bytes // BLOCK // 1024} KiB/token), transfer"
        f" link {args.transfer_gbps:g} GB/s, {args.blocks} KV blocks per worker,"
        f" mock speedup {args.mock_speedup:g}, {args.requests} requests per point;"
        f" SLOs: TTFT <= {args.ttft_slo_ms:g} ms, ITL {args.itl_slo_stat} <="
        f" {args.itl_slo_ms:g} ms",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = write_mock_model(Path(tmp) / "mock", geometry, args.max_model_len)
        rows = asyncio.run(goodput_async(args, model))
    verdicts = []
    for workload in workloads(args):
        mine = [r for r in rows if r["workload"] == workload.name]
        if mine:
            goodput_table(workload, mine)
            verdicts.append(verdict(workload, mine))
            print(verdicts[-1])
    return {"rows": rows, "verdicts": verdicts}


def pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(aggregated, disaggregated) rows of each rate."""
    by = {(r["rate"], r["mode"]): r for r in rows}
    rates = sorted({r["rate"] for r in rows})
    return [(by[(x, "aggregated")], by[(x, "disaggregated")]) for x in rates]


def ratio(a: float, b: float) -> float:
    return b / a if a > 0 else (math.inf if b > 0 else math.nan)


def goodput_table(workload: Workload, rows: list[dict]) -> None:
    print(
        f"\n{workload.name}: prompts {workload.input_len} tokens, answers {workload.output_len}"
        " tokens (latencies and rates in model time)"
    )
    print(
        f"{'req/s':>5} {'mode':>13} {'done':>5} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8}"
        f" {'ITL p99':>8} {'TPOT p50':>8} {'out tok/s':>9} {'busy':>5} {'SLO met':>7}"
        f" {'goodput':>8} {'disagg/agg':>10}"
    )
    for agg, dis in pairs(rows):
        for r in (agg, dis):
            last = f"{ratio(agg['goodput'], dis['goodput']):>9.2f}x" if r is dis else ""
            print(
                f"{r['rate']:>5g} {r['mode']:>13} {r['completed']:>5} {r['ttft_p50_ms']:>9.0f}"
                f" {r['ttft_p99_ms']:>9.0f} {r['itl_p50_ms']:>8.1f} {r['itl_p99_ms']:>8.1f}"
                f" {r['tpot_p50_ms']:>8.1f} {r['output_tok_s']:>9.0f} {r['busy_fraction']:>5.0%}"
                f" {r['good_fraction']:>7.0%} {r['goodput']:>8.2f} {last:>10}"
            )


def verdict(workload: Workload, rows: list[dict]) -> str:
    """Where disaggregation wins and where it loses, from the measured goodputs (a 5% band
    counts as a tie), with the SLO misses of the side that lost each point."""
    wins, losses, ties = [], [], []
    for agg, dis in pairs(rows):
        r = ratio(agg["goodput"], dis["goodput"])
        if r > 1.05:
            wins.append(f"{agg['rate']:g} req/s ({r:.2f}x: aggregated {misses(agg)})")
        elif r < 1 / 1.05:
            losses.append(f"{agg['rate']:g} req/s ({r:.2f}x: disaggregated {misses(dis)})")
        else:
            ties.append(f"{agg['rate']:g}")
    text = (
        f"{workload.name}: disaggregation wins at {', '.join(wins) or 'no rate'};"
        f" loses at {', '.join(losses) or 'no rate'}"
    )
    return text + (f"; ties (within 5%) at {', '.join(ties)} req/s" if ties else "")


def misses(row: dict) -> str:
    failed = row["failed"] + row["cancelled"]
    text = f"missed TTFT {row['missed_ttft']}x, ITL {row['missed_itl']}x"
    return text + (f", {failed} failed" if failed else "")


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parser(__doc__).parse_args(argv)


def parser(description: str | None) -> argparse.ArgumentParser:
    """The fleets', workloads' and SLOs' flags (benchmarks/planner_split.py shares them)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    p.add_argument("--output", type=Path, default=Path("results/disagg_goodput.json"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workloads", nargs="+", choices=["long", "chat"], default=["long", "chat"])
    p.add_argument("--long-input", default="8000")
    p.add_argument("--long-output", default="50")
    p.add_argument("--long-rates", type=float, nargs="+", default=[2.0, 3.5, 5.0, 6.0])
    p.add_argument("--chat-input", default="uniform:500:2500")
    p.add_argument("--chat-output", default="uniform:100:300")
    p.add_argument("--chat-rates", type=float, nargs="+", default=[8.0, 16.0, 24.0, 32.0])
    p.add_argument("--requests", type=int, default=100, help="requests per (workload, rate, mode)")
    p.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    p.add_argument("--itl-slo-ms", type=float, default=20.0, help="on each request's ITL stat")
    p.add_argument(
        "--itl-slo-stat",
        choices=ITL_STATS,
        default="mean",
        help="which of a request's ITLs the SLO checks (mean: TPOT, as DistServe)",
    )
    p.add_argument("--mock-speedup", type=float, default=2.0)
    p.add_argument("--mock-geometry", choices=sorted(GEOMETRIES), default="llama-3.1-8b")
    p.add_argument("--transfer-gbps", type=float, default=25.0)
    p.add_argument(
        "--blocks",
        type=int,
        default=24576,
        help="KV blocks (16 tokens) per worker; 24576 at 8B geometry: 48 GiB, what an 80 GB GPU"
        " holds beside the weights",
    )
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=32768)
    p.add_argument(
        "--local-prefill",
        action="store_true",
        help="tandem's default planner (short prompts and a saturated prefill pool are"
        " prefilled on the decode worker) instead of every request through the prefill worker",
    )
    p.add_argument("--max-seconds", type=float, default=240.0, help="wall bound of each point")
    return p


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    result: dict = {"args": vars(args), "goodput": goodput_part(args)}
    result["runtime_s"] = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str))
    print(f"\ntotal {result['runtime_s']:.0f} s; wrote {args.output}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
