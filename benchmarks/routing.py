"""Routing policies side by side on a fleet of mock workers, plus the router's decision latency.

Each policy gets a fresh fleet (cold prefix caches) of `--workers` mock engines (the real
scheduler and block manager; step times from the polynomial performance model of the public
Dynamo mocker, at real speed), each served by a `Worker` that publishes its load and KV events.
The frontend's `RemoteEngine` routes with the policy under test, exactly as `tandem frontend
--router-mode POLICY` does; only HTTP is left out (in-process discovery, events and request
plane), so that this 2-core machine spends its time on the fleet, not on SSE. `tandem.bench`
supplies the workloads, the arrival processes and the statistics.

Workloads:

* `sessions` - `--users` users share one system prompt and hold multi-turn conversations (the
  context grows by the answer and a new message each turn); closed loop, one turn in flight
  per user. The default (512-1,536-token messages, 64-192-token answers, 8 turns) is
  agent-like: tool output or documents each turn. Lengths vary so that users fall out of step:
  with fixed lengths every closed-loop user sends its turn at the same moment, turn after turn.
* `trace` - the first `--trace-requests` requests of ../shared/traces/conversation_trace.jsonl
  (Mooncake format: 512-token hash blocks give the prefix sharing), arriving at the trace's
  timestamps scaled so that the fleet runs near `--target-load` busy: a probe run with round
  robin measures the busy fraction at the trace's own pace and the scale is set from it.

For each workload and policy: TTFT p50 / p99, ITL p50, output tokens/s, prefix hit rate
(cached prompt tokens over prompt tokens, as the engines report them), fleet busy fraction,
and the most and fewest requests any worker received. Then the micro-benchmark: `select()` for
8k-token prompts over 64 workers whose index holds their blocks, p50 / p99 (block hashing
included; hashing alone reported beside it).

    python benchmarks/routing.py [--workers 8] [--policies kv round_robin least_loaded]
        [--kv-decode-weights 1] [--users 32] [--turns 8] [--message-len uniform:512:1536]
        [--answer-len uniform:64:192] [--trace-requests 400] [--output results/routing.json]
    python benchmarks/routing.py --workloads    # the decision-latency micro-benchmark alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from tandem.bench.engine_client import engine_sender
from tandem.bench.runner import Arrival, Bounds, run_load
from tandem.bench.stats import Slo, percentile, summarize
from tandem.bench.tokens import TokenSpace
from tandem.bench.trace import load_trace
from tandem.bench.workloads import LengthDist, SessionWorkload, TraceWorkload, Workload
from tandem.deploy import LocalCluster
from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.engine.testing import make_tiny_model
from tandem.protocol import KvBlock, KvStored
from tandem.protocol.hashing import block_hashes
from tandem.router import Router

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "conversation_trace.jsonl"
BLOCK = 16


# -- the fleet ---------------------------------------------------------------------------


class Fleet:
    """`n` mock workers and a RemoteEngine routing over them with `policy`, in one process."""

    def __init__(
        self, model: Path, n: int, blocks: int, policy: str, options: dict | None = None,
        tiers: dict | None = None, speedups: tuple[float, ...] = (1.0,),
    ) -> None:  # fmt: skip
        self.engines = [
            AsyncEngine(EngineConfig(model=str(model), engine="mock", num_gpu_blocks=blocks,
                                     max_num_seqs=128, block_size=BLOCK,
                                     mock_speedup=speedups[i % len(speedups)], **(tiers or {})))
            for i in range(n)
        ]  # fmt: skip
        self.cluster = LocalCluster(self.engines, served="mock", lease_ttl=30.0,
                                    policy=policy, router_options=options)  # fmt: skip
        self.remote = self.cluster.remote

    async def __aenter__(self) -> Fleet:
        await self.cluster.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cluster.stop(grace=1.0)
        for e in self.engines:
            e.shutdown()

    def busy_s(self) -> float:
        return sum(e.core.runner.busy_s for e in self.engines)

    def tier_hits(self) -> dict[str, int]:
        """Blocks loaded back from each tier, and loads left to recompute, fleet-wide."""
        out = {"host": 0, "disk": 0, "recomputed": 0}
        for e in self.engines:
            tiers = e.core.block_manager.tiers
            if tiers is not None:
                out["host"] += tiers.hits["host"]
                out["disk"] += tiers.hits["disk"]
                out["recomputed"] += sum(tiers.skipped.values())
        return out


class Variant(NamedTuple):
    label: str
    policy: str
    options: dict


def variants(args: argparse.Namespace) -> list[Variant]:
    """The policies to compare; `kv` once per `--kv-costs` and `--kv-decode-weights` value."""
    out = []
    for policy in args.policies:
        if policy == "kv":
            out += [Variant(f"kv {c} d={w:g}", "kv", {"decode_weight": w, "cost": c})
                    for c in args.kv_costs for w in args.kv_decode_weights]  # fmt: skip
        else:
            out.append(Variant(policy, policy, {}))
    return out


async def run_policy(
    model: Path,
    args: argparse.Namespace,
    variant: Variant,
    workload: Workload,
    arrival: Arrival,
    num_requests: int | None = None,
) -> dict:
    bounds = Bounds(duration_s=args.max_seconds, num_requests=num_requests)
    fleet = Fleet(model, args.workers, args.blocks, variant.policy, variant.options,
                  tier_config(args, model), tuple(args.speedups))  # fmt: skip
    async with fleet:
        busy0 = fleet.busy_s()
        result = await run_load(workload, engine_sender(fleet.remote.generate), arrival, bounds)
        busy = (fleet.busy_s() - busy0) / (result.elapsed_s * args.workers)
        per_worker = sorted(w["requests"] for w in fleet.remote.describe())
        tier_hits = fleet.tier_hits()
    summary = summarize(result.records, result.elapsed_s, Slo())
    cached = summary.get("cached_tokens", {})
    return {
        "policy": variant.label,
        "requests": summary["requests"]["completed"],
        "failed": summary["requests"]["failed"] + summary["requests"]["cancelled"],
        "elapsed_s": result.elapsed_s,
        "ttft_p50_ms": summary["ttft_ms"].get("p50"),
        "ttft_p99_ms": summary["ttft_ms"].get("p99"),
        "itl_p50_ms": summary["itl_ms"].get("p50"),
        "output_tok_s": summary["output_token_throughput"],
        "prefix_hit_rate": cached.get("fraction_of_input"),
        "busy_fraction": busy,
        "max_requests_per_worker": per_worker[-1],
        "min_requests_per_worker": per_worker[0],
        "fair_share": sum(per_worker) / len(per_worker),
        "tier_hit_blocks": tier_hits,
    }


def tier_config(args: argparse.Namespace, model: Path) -> dict:
    """EngineConfig fields for `--host-blocks` / `--disk-blocks` per worker, each block
    modelled at `--modelled-block-mib` (the tiny model's own blocks are a few KiB)."""
    if not (args.host_blocks or args.disk_blocks):
        return {}
    from tandem.engine.loader import load_config, resolve_dtype
    from tandem.engine.model_runner import kv_bytes_per_block

    hf = load_config(str(model))
    real = kv_bytes_per_block(hf, BLOCK, resolve_dtype(EngineConfig.dtype, hf, "cpu"))
    scale = real / (args.modelled_block_mib * 2**20)  # modelled bandwidth in real bytes
    return {
        "kv_offloading_size": (args.host_blocks + 0.5) * real / 2**30,
        "kv_disk_path": tempfile.gettempdir() if args.disk_blocks else None,
        "kv_disk_size": (args.disk_blocks + 0.5) * real / 2**30,
        "mock_host_gbps": args.host_gbps * scale,
        "mock_disk_gbps": args.disk_gbps * scale,
    }


# -- workloads ---------------------------------------------------------------------------


def sessions(args: argparse.Namespace, space: TokenSpace) -> tuple[Workload, Arrival]:
    workload = SessionWorkload(
        users=args.users,
        system_prompt_len=args.system_prompt_len,
        turns=args.turns,
        message_len=LengthDist.parse(str(args.message_len)),
        answer_len=LengthDist.parse(str(args.answer_len)),
        space=space,
        seed=args.seed,
        think_time_s=args.think_time,
    )
    return workload, Arrival("concurrency", concurrency=args.users)


def trace(args: argparse.Namespace, space: TokenSpace, scale: float) -> tuple[Workload, Arrival]:
    loaded = load_trace(TRACE, limit=args.trace_requests)
    workload = TraceWorkload(loaded, space, seed=args.seed, time_scale=scale, source=str(TRACE))
    return workload, Arrival("trace")


# -- decision latency --------------------------------------------------------------------


def decision_latency(workers: int, prompt_tokens: int, queries: int, seed: int = 0) -> dict:
    """`select()` over `workers` whose index holds 16 distinct 8k-token prefixes each, some
    shared, for prompts that extend one of them."""
    rng = random.Random(seed)
    ids = [f"worker-{i:02d}" for i in range(workers)]
    router = Router(BLOCK, "kv")
    prefixes = [[rng.randrange(100, 50_000) for _ in range(prompt_tokens)] for _ in range(64)]
    for w in ids:
        hashes = [h for p in rng.sample(prefixes, 16) for h in block_hashes(p, BLOCK)[1]]
        blocks = [KvBlock(h, 0) for h in hashes]
        router.apply_events(w, [KvStored(event_id=0, parent_sequence_hash=None, blocks=blocks)])
        router.add_worker(w)
    prompts = [p[: rng.randrange(prompt_tokens // 2, prompt_tokens)] for p in prefixes]
    prompts = [p + [rng.randrange(100, 50_000)] * (prompt_tokens - len(p)) for p in prompts]
    total, hashing = [], []
    for q in range(queries):
        tokens = prompts[q % len(prompts)]
        t0 = time.perf_counter()
        router.select(tokens, ids)
        total.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        block_hashes(tokens, BLOCK)
        hashing.append(time.perf_counter() - t0)
    total.sort()
    hashing.sort()
    return {
        "workers": workers,
        "prompt_tokens": prompt_tokens,
        "index_blocks": router.index.num_blocks(),
        "index_approx_bytes": router.index.approx_bytes(),
        "queries": queries,
        "decision_p50_us": percentile(total, 50) * 1e6,
        "decision_p99_us": percentile(total, 99) * 1e6,
        "hashing_p50_us": percentile(hashing, 50) * 1e6,
        "hashing_p99_us": percentile(hashing, 99) * 1e6,
    }


# -- main --------------------------------------------------------------------------------


def table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(
        f"{'policy':>14} {'done':>5} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
        f"{'out tok/s':>9} {'hit rate':>8} {'busy':>5} {'max/min per worker':>19}"
    )
    for r in rows:
        print(
            f"{r['policy']:>14} {r['requests']:>5} {r['ttft_p50_ms']:>9.1f} "
            f"{r['ttft_p99_ms']:>9.1f} {r['itl_p50_ms']:>8.1f} {r['output_tok_s']:>9.0f} "
            f"{(r['prefix_hit_rate'] or 0):>8.1%} {r['busy_fraction']:>5.0%} "
            f"{r['max_requests_per_worker']:>9}/{r['min_requests_per_worker']:<4} "
            f"(fair {r['fair_share']:.0f})"
            + ("  tier loads host {host} disk {disk}, recomputed {recomputed}".format(
                **r["tier_hit_blocks"]) if any(r["tier_hit_blocks"].values()) else "")
        )  # fmt: skip
    base = {r["policy"]: r for r in rows}
    for r in rows:
        if r["policy"].startswith("kv") and "round_robin" in base:
            ratio = base["round_robin"]["ttft_p50_ms"] / r["ttft_p50_ms"]
            print(f"TTFT p50 round_robin / {r['policy']}: {ratio:.2f}x")


async def amain(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "mock", max_position_embeddings=1 << 18)
        space = TokenSpace.for_vocab(384, min_id=2)
        out: dict = {"args": vars(args), "workloads": {}}
        if "sessions" in args.workloads:
            rows = []
            for variant in variants(args):
                workload, arrival = sessions(args, space)
                n = args.users * args.turns
                rows.append(await run_policy(model, args, variant, workload, arrival, n))
                print(f"  sessions / {variant.label}: done", flush=True)
            table(
                f"sessions: {args.users} users, {args.system_prompt_len}-token system prompt,"
                f" {args.turns} turns of {args.message_len} in / {args.answer_len} out",
                rows,
            )
            out["workloads"]["sessions"] = rows
        if "trace" in args.workloads:
            probe_workload, probe_arrival = trace(args, space, 1.0)
            rr = Variant("round_robin", "round_robin", {})
            probe = await run_policy(model, args, rr, probe_workload, probe_arrival)
            scale = probe["busy_fraction"] / args.target_load
            print(
                f"  trace probe at 1.0x pace: fleet busy {probe['busy_fraction']:.0%};"
                f" time scale {scale:.3f} for {args.target_load:.0%}",
                flush=True,
            )
            rows = []
            for variant in variants(args):
                workload, arrival = trace(args, space, scale)
                rows.append(await run_policy(model, args, variant, workload, arrival))
                print(f"  trace / {variant.label}: done", flush=True)
            table(
                f"trace: first {args.trace_requests} requests of {TRACE.name},"
                f" time scale {scale:.3f}",
                rows,
            )
            out["workloads"]["trace"] = {"time_scale": scale, "probe": probe, "rows": rows}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--blocks", type=int, default=16384, help="KV blocks per worker (16 tokens)")
    p.add_argument("--policies", nargs="+", default=["kv", "round_robin", "least_loaded"])
    p.add_argument(
        "--kv-decode-weights",
        nargs="+",
        type=float,
        default=[1.0],
        help="run kv once per weight of decode blocks in its cost (1 = DESIGN.md's baseline)",
    )
    p.add_argument("--kv-costs", nargs="+", choices=["blocks", "seconds"], default=["blocks"],
                   help="run kv once per router cost (`--router-cost`)")
    p.add_argument("--speedups", nargs="+", type=float, default=[1.0],
                   help="mock speed of each worker, cycled (1 2: every other worker 2x faster)")
    p.add_argument("--host-blocks", type=int, default=0, help="host KV tier per worker")
    p.add_argument("--disk-blocks", type=int, default=0, help="disk KV tier per worker")
    p.add_argument("--host-gbps", type=float, default=25.0, help="modelled host tier copies")
    p.add_argument("--disk-gbps", type=float, default=3.0, help="modelled disk tier reads")
    p.add_argument("--modelled-block-mib", type=float, default=2.0,
                   help="bytes a tier moves per block (2 MiB: 16 tokens of Llama-3.1-8B)")
    p.add_argument(
        "--workloads",
        nargs="*",
        choices=["sessions", "trace"],
        default=["sessions", "trace"],
        help="none (a bare --workloads): only the decision-latency micro-benchmark",
    )
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--system-prompt-len", type=int, default=1024)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--message-len", default="uniform:512:1536")
    p.add_argument("--answer-len", default="uniform:64:192")
    p.add_argument("--think-time", type=float, default=0.0, help="seconds between a user's turns")
    p.add_argument("--trace-requests", type=int, default=400)
    p.add_argument("--target-load", type=float, default=0.8)
    p.add_argument("--max-seconds", type=float, default=240.0, help="bound of each run")
    p.add_argument("--decision-workers", type=int, default=64)
    p.add_argument("--decision-tokens", type=int, default=8192)
    p.add_argument("--decision-queries", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=Path("results/routing.json"))
    args = p.parse_args()

    result = asyncio.run(amain(args))
    latency = decision_latency(args.decision_workers, args.decision_tokens, args.decision_queries)
    print(
        f"\ndecision latency, {latency['prompt_tokens']}-token prompts over"
        f" {latency['workers']} workers ({latency['index_blocks']} indexed blocks,"
        f" ~{latency['index_approx_bytes'] / 2**20:.0f} MiB): p50"
        f" {latency['decision_p50_us']:.0f} us, p99 {latency['decision_p99_us']:.0f} us"
        f" (of which block hashing: p50 {latency['hashing_p50_us']:.0f} us,"
        f" p99 {latency['hashing_p99_us']:.0f} us)"
    )
    result["decision_latency"] = latency
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
