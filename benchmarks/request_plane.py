"""Streamed tokens/s and added latency per token: TCP request plane vs the in-process path.

Three paths serve the same endpoint, whose handler streams one token per item (a msgspec
Struct shaped like `GenerateOutput`, plus the handler's send time):

* `inproc`     - `LocalRequestPlane`, handler and caller in this process (embedded mode);
* `tcp-1proc`  - `TcpRequestServer` in this process, over loopback (isolates the protocol cost);
* `tcp-2proc`  - `TcpRequestServer` in a child process (`--serve`), over loopback: the
                 distributed-mode path between a frontend and a worker.

Workloads:

* `throughput` - the handler yields as fast as it can; tokens/s received by the caller, for
  1 stream and for `--streams` concurrent streams multiplexed on one connection.
* `latency`    - the handler yields one token every `--interval` ms (an engine's decode step);
  per-token latency is receive time minus the handler's yield time (CLOCK_MONOTONIC is
  system-wide, so the two processes' clocks agree). Reported as p50/p99 and as the added latency
  over `inproc`, for 1 stream and for `--streams` concurrent paced streams.

Paths alternate round by round; medians over `--repeats` rounds are reported.

    python benchmarks/request_plane.py [--tokens 50000] [--streams 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import msgspec

from tandem.runtime import LocalRequestPlane, TcpRequestClient, TcpRequestServer


class Token(msgspec.Struct, omit_defaults=True, kw_only=True):
    request_id: str
    token_ids: list[int]
    sent_ns: int = 0


class StreamRequest(msgspec.Struct, kw_only=True):
    n: int
    interval: float = 0.0  # seconds between tokens; 0: as fast as possible
    stamp: bool = False


async def stream_tokens(req: StreamRequest):
    if req.interval:
        next_at = time.monotonic()
        for i in range(req.n):
            next_at += req.interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            yield Token(request_id="bench", token_ids=[i], sent_ns=time.monotonic_ns())
    else:
        for i in range(req.n):
            yield Token(
                request_id="bench", token_ids=[i], sent_ns=time.monotonic_ns() if req.stamp else 0
            )


def add_endpoint(server) -> None:
    server.add_endpoint("stream", stream_tokens, request_type=StreamRequest)


async def serve() -> None:
    server = TcpRequestServer()
    add_endpoint(server)
    await server.start()
    print(server.address, flush=True)
    await asyncio.Event().wait()


# ---- measurements ----------------------------------------------------------------------------


async def one_stream(client, address: str, req: StreamRequest, lat: list[float] | None) -> int:
    count = 0
    async for tok in client.call(address, "stream", req, response_type=Token):
        if lat is not None:
            lat.append((time.monotonic_ns() - tok.sent_ns) / 1e3)
        count += len(tok.token_ids)
    return count


async def throughput(client, address: str, streams: int, tokens: int) -> float:
    per = tokens // streams
    start = time.perf_counter()
    counts = await asyncio.gather(
        *(one_stream(client, address, StreamRequest(n=per), None) for _ in range(streams))
    )
    elapsed = time.perf_counter() - start
    assert sum(counts) == per * streams
    return sum(counts) / elapsed


async def latency(client, address: str, streams: int, n: int, interval: float) -> dict:
    lat: list[float] = []
    req = StreamRequest(n=n, interval=interval)
    await asyncio.gather(*(one_stream(client, address, req, lat) for _ in range(streams)))
    lat.sort()
    return {
        "p50_us": lat[len(lat) // 2],
        "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "mean_us": statistics.fmean(lat),
    }


async def bench(args) -> dict:
    plane = LocalRequestPlane()
    local_server = plane.server()
    add_endpoint(local_server)
    await local_server.start()
    tcp_server = TcpRequestServer()
    add_endpoint(tcp_server)
    await tcp_server.start()
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    child_address = (await asyncio.to_thread(child.stdout.readline)).strip()
    tcp_client = TcpRequestClient()
    paths = {
        "inproc": (plane.client(), local_server.address),
        "tcp-1proc": (tcp_client, tcp_server.address),
        "tcp-2proc": (tcp_client, child_address),
    }
    interval = args.interval / 1e3
    lat_tokens = max(50, int(args.latency_seconds / interval))
    cases = [
        ("throughput", 1),
        ("throughput", args.streams),
        ("latency", 1),
        ("latency", args.streams),
    ]
    runs: dict[tuple[str, int], dict[str, list]] = {c: {p: [] for p in paths} for c in cases}
    try:
        for client, address in paths.values():  # warm-up: connections, code paths
            await throughput(client, address, 4, 4000)
        for _ in range(args.repeats):
            for case in cases:
                kind, streams = case
                for name, (client, address) in paths.items():
                    if kind == "throughput":
                        value = await throughput(client, address, streams, args.tokens)
                    else:
                        value = await latency(client, address, streams, lat_tokens, interval)
                    runs[case][name].append(value)
    finally:
        child.kill()
        child.wait()
        await tcp_client.close()
        await tcp_server.stop()
        await local_server.stop()

    rows = []
    for (kind, streams), by_path in runs.items():
        row: dict = {"workload": kind, "streams": streams}
        if kind == "throughput":
            row["tok_s"] = {p: statistics.median(v) for p, v in by_path.items()}
            row["ratio_vs_inproc"] = {p: row["tok_s"][p] / row["tok_s"]["inproc"] for p in by_path}
            row["us_per_token"] = {p: 1e6 / v for p, v in row["tok_s"].items()}
        else:
            row["latency_us"] = {
                p: {k: statistics.median(r[k] for r in v) for k in v[0]} for p, v in by_path.items()
            }
            base = row["latency_us"]["inproc"]
            row["added_us"] = {
                p: {k: row["latency_us"][p][k] - base[k] for k in ("p50_us", "p99_us")}
                for p in by_path
            }
            row["interval_ms"] = args.interval
            row["tokens_per_stream"] = lat_tokens
        row["runs"] = by_path
        rows.append(row)
    return {"paths": list(paths), "rows": rows}


def print_table(result: dict) -> None:
    paths = result["paths"]
    print("\nstreamed tokens/s (median), one token per item")
    print(
        f"{'streams':>8} "
        + " ".join(f"{p:>12}" for p in paths)
        + " "
        + " ".join(f"{p + '/inproc':>18}" for p in paths[1:])
        + " "
        + " ".join(f"{p + ' us/tok':>17}" for p in paths)
    )
    for r in result["rows"]:
        if r["workload"] == "throughput":
            print(
                f"{r['streams']:>8} "
                + " ".join(f"{r['tok_s'][p]:>12,.0f}" for p in paths)
                + " "
                + " ".join(f"{r['ratio_vs_inproc'][p]:>17.2f}x" for p in paths[1:])
                + " "
                + " ".join(f"{r['us_per_token'][p]:>17.2f}" for p in paths)
            )
    for r in result["rows"]:
        if r["workload"] == "latency":
            print(
                f"\nper-token latency, handler yield -> caller, {r['streams']} stream(s) "
                f"paced at {r['interval_ms']} ms ({r['tokens_per_stream']} tokens each), us"
            )
            print(
                f"{'path':>12} {'p50':>8} {'p99':>8} {'mean':>8} {'added p50':>10} "
                f"{'added p99':>10}"
            )
            for p in paths:
                lat, add = r["latency_us"][p], r["added_us"][p]
                print(
                    f"{p:>12} {lat['p50_us']:>8.1f} {lat['p99_us']:>8.1f} {lat['mean_us']:>8.1f} "
                    f"{add['p50_us']:>10.1f} {add['p99_us']:>10.1f}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=50000, help="tokens per throughput run")
    parser.add_argument("--streams", type=int, default=32, help="concurrent streams")
    parser.add_argument("--interval", type=float, default=2.0, help="ms between paced tokens")
    parser.add_argument(
        "--latency-seconds", type=float, default=1.0, help="duration of each paced latency run"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="results/request_plane.json")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve())
        return
    result = asyncio.run(bench(args))
    print_table(result)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.update(
        benchmark="request_plane",
        args={k: v for k, v in vars(args).items() if k != "serve"},
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        python=platform.python_version(),
    )
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
