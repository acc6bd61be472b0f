"""Requests lost, and latency, around a worker killed under load: with and without migration.

In one run, twice (`--migration-limit 3`, then `0`): `tandem serve --workers 2 --engine mock`
on a tiny model, a closed loop of streaming completions from `tandem.bench`, and one worker
SIGKILLed `--kill-at` seconds in (the launcher restarts it). For each: requests completed and
failed, TTFT and ITL percentiles (a migrated stream's pause shows as its largest ITL), and
`tandem_migrations_total`. Prints a table, writes JSON.

    python benchmarks/faults.py [--concurrency 16] [--duration 8] [--kill-at 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from tandem.bench.client import ClientConfig, StreamClient
from tandem.bench.runner import Arrival, Bounds, run_load
from tandem.bench.stats import Slo, summarize
from tandem.bench.tokens import TokenSpace
from tandem.bench.workloads import LengthDist, SyntheticWorkload
from tandem.deploy.processes import free_port
from tandem.engine.testing import make_tiny_model
from tandem.runtime.testing import child_pids, wait_for_health


def start_cluster(model: Path, port: int, migration_limit: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tandem.cli.main", "serve", str(model), "--engine", "mock",
           "--workers", "2", "--port", str(port), "--router-mode", "round_robin",
           "--num-gpu-blocks", "4096", "--migration-limit", str(migration_limit)]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    wait_for_health(proc, f"http://127.0.0.1:{port}", log, 180, lambda h: h.get("workers") == 2)
    return proc


async def drive(base: str, args: argparse.Namespace, victim: int) -> Any:
    lengths = LengthDist.fixed(args.input_len), LengthDist.fixed(args.output_len)
    workload = SyntheticWorkload(*lengths, TokenSpace.for_vocab(256), seed=1)  # tiny vocab
    cfg = ClientConfig(base, "tiny", max_connections=args.concurrency)

    async def kill() -> None:
        await asyncio.sleep(args.kill_at)
        os.kill(victim, signal.SIGKILL)

    async with StreamClient(cfg) as client:
        killer = asyncio.create_task(kill())
        result = await run_load(workload, client.send, Arrival("concurrency", args.concurrency),
                                Bounds(args.duration, None))  # fmt: skip
        await killer
    return result


def run_mode(model: Path, migration_limit: int, args: argparse.Namespace, tmp: Path) -> dict:
    port = free_port()
    proc = start_cluster(model, port, migration_limit, tmp / f"serve-{migration_limit}.log")
    base = f"http://127.0.0.1:{port}"
    try:
        result = asyncio.run(drive(base, args, child_pids(proc, "worker")[0]))
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    found = re.search(r"^tandem_migrations_total (\S+)$", metrics, re.M)
    summary = summarize(result.records, result.elapsed_s, Slo())
    summary["migrations"] = float(found.group(1)) if found else 0.0
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=8.0, help="seconds of load per mode")
    p.add_argument("--kill-at", type=float, default=3.0, help="seconds in, one worker is killed")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--output", type=Path, default=Path("results/faults.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "tiny")
        modes = {f"migration_limit_{n}": run_mode(model, n, args, Path(tmp)) for n in (3, 0)}
    print(f"{'':22s} {'done':>6s} {'failed':>6s} {'migrated':>8s} {'TTFT p50':>9s}"
          f" {'TTFT p99':>9s} {'ITL p50':>8s} {'ITL p99':>8s} {'ITL max':>8s}  (ms)")  # fmt: skip
    for name, s in modes.items():
        r, t, i = s["requests"], s["ttft_ms"], s["itl_ms"]
        print(f"{name:22s} {r['completed']:6d} {r['failed']:6d} {s['migrations']:8.0f}"
              f" {t['p50']:9.1f} {t['p99']:9.1f} {i['p50']:8.1f} {i['p99']:8.1f} {i['max']:8.1f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"args": vars(args) | {"output": str(args.output)},
                                       "modes": modes}, indent=2))  # fmt: skip
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
