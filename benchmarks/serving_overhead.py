"""The ceiling of our serving path and of our load generator: a mock server with zero step time.

`tandem serve MODEL --engine mock` with a performance profile of 0 ms per step runs the real
HTTP frontend (parsing, detokenisation, SSE), async engine loop, scheduler and block manager,
but no model: every millisecond it spends is our own Python. `tandem.bench` (its runner and
streaming client, in this process) drives it with closed-loop concurrency rising over the
levels, short prompts and 64 output tokens (EOS ignored). For each level it prints the
request and output-token rates sustained, TTFT and E2E latency, and the CPU time per generated
token of the bench client (this process, `time.process_time`) and of the server (its process,
from /proc/PID/stat: all threads, user + system). Both share this machine's cores, so read
the rates as "frontend + engine loop + client, together, on this box".

    python benchmarks/serving_overhead.py [--model DIR] [--concurrency 1 4 16 64 128]
        [--input-len 32] [--output-len 64] [--requests N] [--step-ms 0]
        [--connection-close] [--output FILE]

MODEL needs only config.json and tokenizer files; the default is the demo model
(SmolLM2-135M-Instruct, converted once into ~/.cache/tandem/models), else a tiny random model
built in a temporary folder (its byte-level vocabulary makes ~half the random tokens lone
UTF-8 bytes that share an SSE chunk with the next token, so its per-token costs read low).

The client keeps connections alive, as the bench and the openai client do. `--connection-close`
opens one per request instead; while `tandem serve` leaves TCP_NODELAY off on accepted
connections, a reused one delays every first token by ~40 ms (Nagle + delayed ACK), which
caps the low-concurrency rates. Results go to results/serving_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tandem.bench.client import ClientConfig, StreamClient, probe_server
from tandem.bench.runner import Arrival, Bounds, run_load
from tandem.bench.stats import Slo, summarize
from tandem.bench.tokens import TokenSpace
from tandem.bench.workloads import LengthDist, SyntheticWorkload
from tandem.deploy.processes import free_port

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads), from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def model_folder(arg: str | None, tmp: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), Path(arg).name
    from tandem.engine.model_source import ModelSourceError, resolve_model

    try:
        return resolve_model(None, need_weights=False), "SmolLM2-135M-Instruct (demo)"
    except ModelSourceError as exc:
        from tandem.engine.testing import make_tiny_model

        print(f"demo model unavailable ({exc}); using a tiny random model", file=sys.stderr)
        return make_tiny_model(tmp / "tiny", "llama"), "tiny llama (random)"


def start_server(
    model: Path, tmp: Path, max_seqs: int, step_ms: float
) -> tuple[subprocess.Popen, str]:
    profile = tmp / "profile.json"
    profile.write_text(json.dumps({"prefill": [[1, step_ms]], "decode": [[1, 1, step_ms]]}))
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tandem.cli.main",  # the `tandem` command
        "serve",
        str(model),
        "--engine",
        "mock",
        "--perf-model",
        str(profile),
        "--port",
        str(port),
        "--num-gpu-blocks",
        "16384",
        "--max-num-seqs",
        str(max(256, max_seqs)),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("tandem serve --engine mock did not start") from None
            time.sleep(0.2)


def run_level(
    url: str,
    model: str,
    space: TokenSpace,
    pid: int,
    concurrency: int,
    requests: int,
    input_len: int,
    output_len: int,
    seed: int,
    connection_close: bool = False,
) -> dict:
    workload = SyntheticWorkload(
        LengthDist.fixed(input_len), LengthDist.fixed(output_len), space, seed
    )
    arrival = Arrival("concurrency", concurrency)
    cfg = ClientConfig(url, model, max_connections=arrival.connections)

    async def go():
        async with StreamClient(cfg) as client:
            if connection_close:
                client._headers["Connection"] = "close"
            return await run_load(workload, client.send, arrival, Bounds(120.0, requests))

    client0, server0 = time.process_time(), proc_cpu_s(pid)
    result = asyncio.run(go())
    client_cpu = time.process_time() - client0
    server_cpu = proc_cpu_s(pid) - server0
    s = summarize(result.records, result.elapsed_s, Slo())
    tokens = s["output_tokens"]
    return {
        "concurrency": concurrency,
        "requests": s["requests"],
        "elapsed_s": result.elapsed_s,
        "request_throughput": s["request_throughput"],
        "output_token_throughput": s["output_token_throughput"],
        "ttft_ms": s["ttft_ms"],
        "e2e_ms": s["e2e_ms"],
        "itl_ms": s["itl_ms"],
        "output_tokens": tokens,
        "client_cpu_s": client_cpu,
        "server_cpu_s": server_cpu,
        "client_cpu_us_per_token": client_cpu / tokens * 1e6 if tokens else None,
        "server_cpu_us_per_token": server_cpu / tokens * 1e6 if tokens else None,
        "client_cores": client_cpu / result.elapsed_s,
        "server_cores": server_cpu / result.elapsed_s,
    }


def print_row(r: dict) -> None:
    print(
        f"{r['concurrency']:>5} {r['requests']['completed']:>6} {r['request_throughput']:>8.1f}"
        f" {r['output_token_throughput']:>9.0f} {r['ttft_ms']['p50']:>9.1f}"
        f" {r['e2e_ms']['p50']:>8.1f}"
        f" {r['client_cpu_us_per_token']:>11.0f} {r['server_cpu_us_per_token']:>11.0f}"
        f" {r['client_cores']:>7.2f} {r['server_cores']:>7.2f}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF folder with config.json + tokenizer (default: demo)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64, 128])
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument(
        "--requests", type=int, help="requests per level (default: max(64, 6 x concurrency))"
    )
    ap.add_argument(
        "--step-ms",
        type=float,
        default=0.0,
        help="modelled time of every step (default 0: no sleep, so the engine thread holds"
        " the GIL while it has work; 0.001 sleeps and lets the frontend run between steps)",
    )
    ap.add_argument(
        "--connection-close",
        action="store_true",
        help="one connection per request instead of the client's keep-alive pool",
    )
    ap.add_argument("--output", type=Path, default=Path("results/serving_overhead.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model, model_label = model_folder(args.model, tmp)
        proc, url = start_server(model, tmp, max(args.concurrency), args.step_ms)
        try:
            info = asyncio.run(probe_server(url))
            space = TokenSpace.for_vocab(info.vocab_size or 32000)
            # Warm-up: one-off costs of a fresh server (imports, first requests).
            run_level(url, info.model, space, proc.pid, 4, 16, args.input_len, 8, seed=10**6)
            conn = "connection: close" if args.connection_close else "keep-alive"
            print(
                f"mock server, {args.step_ms:g} ms steps · {conn} · {model_label} ·"
                f" {args.input_len} tokens in, {args.output_len} out · {os.cpu_count()} CPUs"
            )
            print(
                f"{'conc':>5} {'done':>6} {'req/s':>8} {'out tok/s':>9} {'TTFT p50':>9}"
                f" {'E2E p50':>8} {'client':>11} {'server':>11}"
                f" {'client':>7} {'server':>7}"
            )
            print(
                f"{'':>5} {'':>6} {'':>8} {'':>9} {'ms':>9} {'ms':>8}"
                f" {'CPU us/tok':>11} {'CPU us/tok':>11} {'cores':>7} {'cores':>7}"
            )
            rows = []
            for c in args.concurrency:
                n = args.requests or max(64, 6 * c)
                row = run_level(
                    url,
                    info.model,
                    space,
                    proc.pid,
                    c,
                    n,
                    args.input_len,
                    args.output_len,
                    c,
                    args.connection_close,
                )
                rows.append(row)
                print_row(row)
        finally:
            proc.terminate()
            proc.wait(timeout=15)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "benchmark": "serving_overhead",
                "model": model_label,
                "input_len": args.input_len,
                "output_len": args.output_len,
                "step_ms": args.step_ms,
                "connection_close": args.connection_close,
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                },
                "levels": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
