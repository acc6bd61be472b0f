"""The SLA planner against fixed fleets and a purely reactive scaler, under a load that
rises 1x -> 4x -> 1x.

A disaggregated mock fleet (`engine="mock"`: the real scheduler and block manager, step
times from the default performance model; Llama-3.1-8B's KV geometry, `--blocks` per worker)
runs in this process behind the frontend's `RemoteEngine`, one policy at a time, on the same
arrivals: an inhomogeneous Poisson process at rate(t) = base * (1 + 3 sin^2(pi t / T)) of
random prompts and answers. Policies:

- static-peak / static-mean: the pools the replica calculator asks for at the peak and at the
  mean rate, on the mock's own performance model (exact step times: an operator's best
  provisioning), held all run;
- reactive: starts at one worker a pool, adds one to a pool whose p90 missed its target in
  the last interval, removes one after `--shrink-after` intervals under half the target;
- planner: `tandem.planner` (forecast, sizing from the length distribution, reactive
  correction, slow shrink), its step models learned from the workers' published steps (no
  seed), starting at one worker a pool.

A worker asked for holds its GPU from then on: it serves after `--startup-s`, and leaves by
draining. Per policy: SLA attainment (requests with TTFT <= target and TPOT (their mean
inter-token gap) <= target; failed ones miss), worker-seconds (GPU time held), goodput per
worker-second, and the planner's pool sizes over time. Times are model times: `--speedup`
divides every modelled time (and the run) and the figures are scaled back; this machine's
Python overhead is multiplied by it, so keep it low. Writes `--output` JSON; asserts nothing.

    python benchmarks/planner.py                      # ~22 minutes on 2 cores
    python benchmarks/planner.py --duration 240 --policies planner static-peak
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from disagg_goodput import VOCAB, write_mock_model
from kv_transfer import BLOCK, GEOMETRIES
from planner_split import PerfModelSteps

from tandem.bench.engine_client import engine_sender
from tandem.bench.runner import Arrival, Bounds, run_load
from tandem.bench.tokens import TokenSpace
from tandem.bench.workloads import LengthDist, SyntheticWorkload, Workload
from tandem.deploy import LocalCluster
from tandem.deploy.scaling import ClusterScaler
from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.frontend.disagg import DisaggConfig
from tandem.planner import PoolBounds, StepModel, decode_replicas, prefill_replicas
from tandem.planner.loop import PlannerLoop
from tandem.planner.plan import Decision, Observation, Planner, PlannerConfig

POLICIES = ("static-peak", "static-mean", "reactive", "planner")


def rate_at(t: float, args: argparse.Namespace) -> float:
    """Requests a second (model time) at `t` seconds into the run: 1x -> 4x -> 1x."""
    return args.base_rate * (1 + 3 * math.sin(math.pi * t / args.duration) ** 2)


def arrival_times(args: argparse.Namespace) -> list[float]:
    """Inhomogeneous Poisson arrivals (model seconds) by thinning at the peak rate."""
    rng, peak, t, times = random.Random(args.seed), 4 * args.base_rate, 0.0, []
    while True:
        t += rng.expovariate(peak)
        if t >= args.duration:
            return times
        if rng.random() < rate_at(t, args) / peak:
            times.append(t)


class Timed(Workload):
    """A workload's requests, sent at the given times (wall seconds)."""

    name = "timed"

    def __init__(self, inner: Workload, times: list[float]) -> None:
        self.inner, self.times = inner, iter(times)

    async def next_request(self):
        at = next(self.times, None)
        if at is None:
            return None
        return dataclasses.replace(await self.inner.next_request(), arrival_s=at)

    def describe(self) -> dict:
        return self.inner.describe()


class Reactive:
    """The reactive-only baseline: +1 to a pool whose p90 missed (unless one is starting),
    -1 after `shrink_after` intervals under half the target. `Planner`'s interface."""

    def __init__(self, config: PlannerConfig) -> None:
        self.config = config
        self.model = self.decode_model = StepModel()  # fed by the loop, unused
        self._calm = {"prefill": 0, "decode": 0}

    def step(self, seen: Observation) -> Decision:
        c, d = self.config, Decision(seen.prefill_replicas, seen.decode_replicas, None)
        d.prefill_replicas = self._one("prefill", seen.ttft_p90_s, c.ttft_s, seen.prefill_replicas,
                                       seen.prefill_starting, c.prefill)  # fmt: skip
        d.decode_replicas = self._one("decode", seen.itl_p90_s, c.itl_s, seen.decode_replicas,
                                      seen.decode_starting, c.decode)  # fmt: skip
        return d

    def _one(self, pool, seen: float | None, target: float, n: int, starting: int, bounds) -> int:
        if seen is not None and seen > target:
            if starting:  # the worker added last time is not serving yet
                return n
            self._calm[pool] = 0
            return min(n + 1, bounds.max_replicas)
        calm = seen is None or seen < target / 2
        self._calm[pool] = self._calm[pool] + 1 if calm else 0
        if self._calm[pool] >= self.config.shrink_after and n > bounds.min_replicas:
            self._calm[pool] = 0
            return n - 1
        return n


def static_sizes(args: argparse.Namespace, config: PlannerConfig, rate: float) -> tuple[int, int]:
    lengths = LengthDist.parse(args.input_len), LengthDist.parse(args.output_len)
    rng = random.Random(1)
    prompts = [lengths[0].sample(rng) for _ in range(2000)]
    outputs = [lengths[1].sample(rng) for _ in range(2000)]
    model = PerfModelSteps(args.blocks * BLOCK)
    p = prefill_replicas(model, rate, prompts, config.ttft_s, config.prefill)
    d = decode_replicas(model, rate, prompts, outputs, config.itl_s, args.blocks * BLOCK,
                        config.decode)  # fmt: skip
    return p, d


def oracle_worker_seconds(args: argparse.Namespace, config: PlannerConfig) -> float:
    """A bound no policy can beat by much: the pools the calculator asks for at each moment's
    true rate on the exact step times, started and drained instantly (5 s steps)."""
    step = 5.0
    sizes = (static_sizes(args, config, rate_at(t + step / 2, args))
             for t in np.arange(0.0, args.duration, step))  # fmt: skip
    return sum(p + d for p, d in sizes) * step


def engine(model: Path, args: argparse.Namespace) -> AsyncEngine:
    return AsyncEngine(EngineConfig(model=str(model), engine="mock", dtype="bfloat16",
                                    num_gpu_blocks=args.blocks, block_size=BLOCK,
                                    max_num_seqs=256, mock_speedup=args.speedup))  # fmt: skip


async def run_policy(policy: str, model: Path, args: argparse.Namespace, config: PlannerConfig,
                     times: list[float], sizes: dict[str, tuple[int, int]]) -> dict:  # fmt: skip
    s = args.speedup
    p0, d0 = sizes.get(policy, (1, 1))
    engines = [engine(model, args) for _ in range(p0 + d0)]
    made: list[AsyncEngine] = []

    def make(role):
        made.append(engine(model, args))
        return made[-1]

    cluster = LocalCluster(engines, ["prefill"] * p0 + ["decode"] * d0, served="mock",
                           lease_ttl=10.0, publish_interval=0.1 / s, policy="kv",
                           disagg=DisaggConfig(max_local_prefill_length=0,
                                               max_prefill_queue_tokens=1 << 60),
                           report_interval=1.0 / s)  # fmt: skip
    # The planner sees wall times: its targets are the model ones over the speedup.
    wall = dataclasses.replace(config, ttft_s=config.ttft_s / s, itl_s=config.itl_s / s)
    load = SyntheticWorkload(LengthDist.parse(args.input_len), LengthDist.parse(args.output_len),
                             TokenSpace.for_vocab(VOCAB), seed=args.seed)  # fmt: skip
    timeline, decisions = [], []
    try:
        async with cluster:
            scaler = ClusterScaler(cluster, make, startup_s=args.startup_s / s, grace=60.0 / s)
            loop = None
            if policy in ("reactive", "planner"):
                planner = Reactive(wall) if policy == "reactive" else Planner(
                    wall, StepModel(), StepModel())
                loop = PlannerLoop(planner, cluster.events, scaler, interval=args.interval / s,
                                   namespace=cluster.remote.namespace)  # fmt: skip
                await loop.start()
            started = time.monotonic()

            async def sample_sizes() -> None:
                while True:
                    timeline.append(((time.monotonic() - started) * s, *scaler.replicas()))
                    await asyncio.sleep(args.interval / s)

            sampler = asyncio.get_running_loop().create_task(sample_sizes())
            result = await run_load(
                Timed(load, [t / s for t in times]), engine_sender(cluster.remote.generate),
                Arrival("trace"), Bounds(duration_s=(args.duration + 120) / s),
            )  # fmt: skip
            sampler.cancel()
            if loop is not None:
                await loop.stop()
                decisions = [decision_row(tick, started, s) for tick in loop.history]
            worker_s = scaler.worker_seconds() * s
            await scaler.close()
    finally:
        for e in engines + made:
            e.shutdown()
    return summarize(policy, result.records, worker_s, timeline, args) | {"decisions": decisions}


def decision_row(tick, started: float, speedup: float) -> dict:
    """One planner interval in model time: the rate seen, the forecast, the sizes, why."""
    seen, decision = tick.seen, tick.decision
    return {
        "t": (tick.at - started) * speedup,
        "rate": seen.requests / seen.seconds / speedup if seen.seconds else 0.0,
        "forecast": (decision.forecast_rate or 0.0) / speedup,
        "sizes": (decision.prefill_replicas, decision.decode_replicas),
        "reasons": decision.reasons,
    }


def summarize(policy, records, worker_s, timeline, args) -> dict:
    s = args.speedup
    good = 0
    for r in records:
        if not r.ok or r.ttft_s is None or r.e2e_s is None:
            continue
        tpot = (r.e2e_s - r.ttft_s) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        good += r.ttft_s * s <= args.ttft_slo and tpot * s <= args.itl_slo
    failed = sum(not r.ok for r in records)
    ttfts = sorted(r.ttft_s * s for r in records if r.ttft_s is not None)
    return {
        "policy": policy, "requests": len(records), "failed": failed, "good": good,
        "attainment": good / len(records) if records else math.nan,
        "worker_seconds": worker_s, "goodput_per_worker_s": good / worker_s,
        "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else math.nan,
        "first_error": next((r.error_detail for r in records if r.error), None),
        "pool_sizes": timeline,
    }  # fmt: skip


async def main_async(args: argparse.Namespace) -> dict:
    config = PlannerConfig(ttft_s=args.ttft_slo, itl_s=args.itl_slo, prefill=PoolBounds(1, 4),
                           decode=PoolBounds(1, 6), gpu_budget=args.gpu_budget,
                           kv_tokens_per_worker=args.blocks * BLOCK,
                           shrink_after=args.shrink_after,
                           lead_intervals=math.ceil(args.startup_s / args.interval))  # fmt: skip
    sizes = {"static-peak": static_sizes(args, config, 4 * args.base_rate),
             "static-mean": static_sizes(args, config, 2.5 * args.base_rate)}  # fmt: skip
    oracle = oracle_worker_seconds(args, config)
    times = arrival_times(args)
    print(f"{len(times)} requests over {args.duration:g} s (model time), rate {args.base_rate:g}"
          f" -> {4 * args.base_rate:g} -> {args.base_rate:g} req/s; static pools (prefill,"
          f" decode): peak {sizes['static-peak']}, mean {sizes['static-mean']}",
          flush=True)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_mock_model(Path(tmp) / "mock", GEOMETRIES["llama-3.1-8b"], 32768)
        for policy in args.policies:
            row = await run_policy(policy, model, args, config, times, sizes)
            rows.append(row)
            print(f"  {policy}: {row['attainment']:.1%} met the SLOs ({row['failed']} failed),"
                  f" {row['worker_seconds']:.0f} worker-s", flush=True)  # fmt: skip
    return {"static_sizes": sizes, "oracle_worker_seconds": oracle, "rows": rows}


def report(result: dict) -> None:
    rows = {r["policy"]: r for r in result["rows"]}
    peak = rows.get("static-peak")
    print(f"\n{'policy':>12} {'requests':>8} {'failed':>6} {'SLO met':>8} {'worker-s':>9}"
          f" {'vs peak':>8} {'good/worker-s':>13}")  # fmt: skip
    for r in result["rows"]:
        versus = f"{r['worker_seconds'] / peak['worker_seconds']:.2f}x" if peak else "-"
        print(f"{r['policy']:>12} {r['requests']:>8} {r['failed']:>6} {r['attainment']:>8.1%}"
              f" {r['worker_seconds']:>9.0f} {versus:>8} {r['goodput_per_worker_s']:>13.3f}")
    oracle, duration = result["oracle_worker_seconds"], result["args"]["duration"]
    ideal = sum(result["static_sizes"]["static-peak"]) * duration
    print(f"\noracle (exact step times, true rate, instant start and drain): {oracle:.0f}"
          f" worker-s = {oracle / ideal:.2f}x static-peak's over the same {duration:g} s")
    if "planner" in rows and peak and "static-mean" in rows:
        p = rows["planner"]
        print(f"\nplanner: attainment {p['attainment']:.1%} (target >= 95%), worker-seconds"
              f" {p['worker_seconds'] / peak['worker_seconds']:.2f}x static-peak (target <="
              f" 0.70x), static-mean's attainment {rows['static-mean']['attainment']:.1%}"
              " (planner's must be above)")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--duration", type=float, default=300.0, help="model seconds of load")
    p.add_argument("--base-rate", type=float, default=2.5, help="requests/s at 1x")
    p.add_argument("--input-len", default="uniform:200:1000")
    p.add_argument("--output-len", default="uniform:50:150")
    p.add_argument("--ttft-slo", type=float, default=0.5, help="seconds")
    p.add_argument("--itl-slo", type=float, default=0.025, help="seconds (a request's TPOT)")
    p.add_argument("--blocks", type=int, default=1024, help="KV blocks of 16 tokens per worker")
    p.add_argument("--startup-s", type=float, default=30.0, help="a new worker's start-up")
    p.add_argument("--interval", type=float, default=10.0, help="planner interval (s)")
    p.add_argument("--shrink-after", type=int, default=3)
    p.add_argument("--gpu-budget", type=int, default=8, help="workers at most, both pools")
    p.add_argument("--speedup", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=Path("results/planner.json"))
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    result = asyncio.run(main_async(args))
    result["args"] = vars(args)
    report(result)
    result["runtime_s"] = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str))
    print(f"\ntotal {result['runtime_s']:.0f} s; wrote {args.output}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
