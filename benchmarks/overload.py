"""Overload: does admission keep the admitted requests fast and the frontend's memory flat?

In one run: `tandem serve --workers 2 --engine mock` on a tiny model, its capacity measured
with a closed loop (`--probe-concurrency` streams: requests per second at saturation), then
Poisson arrivals at 0.25x (unloaded), 1x and 3x that rate for `--duration` seconds each. For
each phase: admitted requests' TTFT p50/p99, how many got 503 and how fast, the frontend's RSS
(sampled every 0.5 s). Prints the 3x/unloaded TTFT p99 ratio and the RSS growth, writes JSON.

The load generator's own event loop is busy with thousands of SSE events a second, so its
timing of a 503 includes its own lag. A second, quiet process (this script with `--prober`)
sends one small request every 50 ms during each phase and times the 503s it gets: "503 p99
(prober)" is the server's rejection latency as a lightly loaded client sees it; its served
one-token requests give the TTFT ratio the same way. How late the load generator's own event
loop runs is measured too (its heap is frozen for the run, so that its garbage collections do
not pause it), and each admitted request's (start, TTFT) is in the JSON.

    python benchmarks/overload.py [--duration 20] [--max-waiting 64]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tandem.bench.client import ClientConfig, StreamClient
from tandem.bench.runner import Arrival, Bounds, run_load
from tandem.bench.stats import Slo, describe, summarize
from tandem.bench.tokens import TokenSpace
from tandem.bench.workloads import LengthDist, SyntheticWorkload
from tandem.deploy.processes import free_port
from tandem.engine.testing import make_tiny_model
from tandem.runtime.heap import freeze_startup_heap
from tandem.runtime.testing import child_pids, wait_for_health


def start(model: Path, port: int, max_waiting: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tandem.cli.main", "serve", str(model), "--engine", "mock",
           "--workers", "2", "--port", str(port), "--num-gpu-blocks", "4096",
           "--max-waiting", str(max_waiting)]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_health(proc, f"http://127.0.0.1:{port}", log, 180, lambda h: h.get("workers") == 2)
    except RuntimeError:
        proc.kill()
        raise
    return proc


def admission_limit(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("tandem_admission_inflight_limit "):
            return float(line.split()[1])
    return float("nan")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def phase(base: str, arrival: Arrival, seconds: float, args, pid: int) -> dict[str, Any]:
    lengths = LengthDist.fixed(args.input_len), LengthDist.fixed(args.output_len)
    workload = SyntheticWorkload(*lengths, TokenSpace.for_vocab(256), seed=arrival.seed)
    samples: list[tuple[float, float]] = []

    limits: list[tuple[float, float]] = []

    async def sample() -> None:
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=base) as http:
            while True:
                now = time.monotonic() - started
                samples.append((now, rss_mib(pid)))
                with contextlib.suppress(httpx.HTTPError):
                    limits.append((now, admission_limit((await http.get("/metrics")).text)))
                await asyncio.sleep(0.5)

    lags: list[float] = []

    async def loop_lag() -> None:  # how late this process's own event loop runs
        while True:
            started = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - started - 0.01)

    async with StreamClient(ClientConfig(base, "tiny")) as client:
        freeze_startup_heap()  # a collection pause here would be timed as the server's
        sampler, lagger = asyncio.create_task(sample()), asyncio.create_task(loop_lag())
        result = await run_load(workload, client.send, arrival, Bounds(seconds, None))
        sampler.cancel()
        lagger.cancel()
    summary = summarize(result.records, result.elapsed_s, Slo())
    rejected = [r for r in result.records if r.http_status == 503]
    summary["rejected"] = len(rejected)
    summary["rejection_ms"] = describe((r.e2e_s for r in rejected if r.e2e_s is not None), 1e3)
    summary["rss_mib"] = samples
    summary["client_loop_lag_ms"] = describe(lags, 1e3)
    summary["ttft_series"] = [(round(r.start_s, 4), round(r.ttft_s, 4)) for r in result.records
                              if r.ttft_s is not None]  # fmt: skip
    summary["inflight_limit"] = limits
    half = seconds / 2  # the second half: after admission has adapted to the phase's load
    summary["ttft_ms_second_half"] = describe(
        (r.ttft_s for r in result.records if r.ttft_s is not None and r.start_s >= half), 1e3
    )
    return summary


def prober(base: str, seconds: float, interval: float = 0.05) -> None:
    """Print one JSON list of [status, seconds] for requests sent every `interval` s."""
    body = {"model": "tiny", "prompt": [5] * 16, "max_tokens": 1}
    out = []
    with httpx.Client(base_url=base, timeout=30) as http:
        freeze_startup_heap()  # a collection here would be timed as the server's latency
        end = time.monotonic() + seconds
        while (now := time.monotonic()) < end:
            with contextlib.suppress(httpx.HTTPError):
                status = http.post("/v1/completions", json=body).status_code
                out.append([status, time.monotonic() - now])
            time.sleep(max(0.0, interval - (time.monotonic() - now)))
    print(json.dumps(out))


def start_prober(base: str, seconds: float) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--prober", base, "--duration", str(seconds)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def prober_rejections(proc: subprocess.Popen) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=120)
    replies = json.loads(out)
    times = [t for status, t in replies if status == 503]
    served = [t for status, t in replies if status == 200]  # one token: latency ~ TTFT
    return {"rejected": len(times), "rejection_ms": describe(times, 1e3),
            "served_ms": describe(served, 1e3)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    p.add_argument("--probe-concurrency", type=int, default=64)
    p.add_argument("--max-waiting", type=int, default=64, help="the frontend's --max-waiting")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--output", type=Path, default=Path("results/overload.json"))
    p.add_argument("--prober", metavar="URL", help=argparse.SUPPRESS)  # the quiet process
    args = p.parse_args()
    if args.prober:
        return prober(args.prober, args.duration)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "tiny")
        port = free_port()
        proc = start(model, port, args.max_waiting, Path(tmp) / "serve.log")
        base = f"http://127.0.0.1:{port}"
        try:
            pid = child_pids(proc, "frontend")[0]
            probe = asyncio.run(phase(base, Arrival("concurrency", args.probe_concurrency),
                                      min(10.0, args.duration), args, pid))  # fmt: skip
            capacity = probe["request_throughput"]
            print(f"capacity: {capacity:.1f} requests/s (closed loop of {args.probe_concurrency})")
            phases = {}
            for i, x in enumerate((0.25, 1.0, 3.0)):
                arrival = Arrival("poisson", rate=x * capacity, seed=i)
                quiet = start_prober(base, args.duration)
                phases[f"{x:g}x"] = asyncio.run(phase(base, arrival, args.duration, args, pid))
                phases[f"{x:g}x"]["prober"] = prober_rejections(quiet)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    print(f"{'phase':6s} {'sent':>6s} {'done':>6s} {'503':>6s} {'TTFT p50':>9s} {'TTFT p99':>9s}"
          f" {'503 p50':>8s} {'503 p99':>8s} {'RSS MiB':>14s} {'2nd half p99':>12s}"
          f" {'limit':>11s} {'503 p99 (prober)':>16s}")  # fmt: skip
    for name, s in phases.items():
        t, rj, rss = s["ttft_ms"], s["rejection_ms"], [m for _, m in s["rss_mib"]]
        limit = [v for _, v in s["inflight_limit"]] or [float("nan")]
        print(f"{name:6s} {s['requests']['sent']:6d} {s['requests']['completed']:6d}"
              f" {s['rejected']:6d} {t['p50']:9.1f} {t['p99']:9.1f} {rj['p50']:8.1f}"
              f" {rj['p99']:8.1f} {min(rss):6.0f}-{max(rss):<6.0f}"
              f" {s['ttft_ms_second_half']['p99']:12.1f}"
              f" {min(limit):5.0f}-{max(limit):<5.0f}"
              f" {s['prober']['rejection_ms']['p99']:16.1f}")  # fmt: skip
    ratio = phases["3x"]["ttft_ms"]["p99"] / phases["0.25x"]["ttft_ms"]["p99"]
    quiet = [phases[x]["prober"]["served_ms"]["p99"] for x in ("0.25x", "3x")]
    print(f"prober (a quiet client, 16-token prompts, 1 token): served p99 {quiet[0]:.1f} ms"
          f" unloaded, {quiet[1]:.1f} ms at 3x: {quiet[1] / quiet[0]:.2f}x")
    lag = max(s["client_loop_lag_ms"]["p99"] for s in phases.values())
    print(f"the load generator's own event loop ran late by {lag:.1f} ms p99 (its worst phase)")
    rss_all = [m for s in phases.values() for _, m in s["rss_mib"]]
    print(f"admitted TTFT p99 at 3x / unloaded: {ratio:.2f}x (target <= 2);"
          f" frontend RSS {rss_all[0]:.0f} -> {rss_all[-1]:.0f} MiB")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    out = {"args": vars(args) | {"output": str(args.output)}, "capacity_rps": capacity,
           "probe": probe, "phases": phases, "ttft_p99_ratio_3x": ratio}  # fmt: skip
    args.output.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
