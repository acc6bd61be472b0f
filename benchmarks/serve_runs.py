"""engine_gpu.py's serving part: `tandem serve --load-format dummy` in a subprocess, driven by
`tandem bench run`."""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

# isort: off
import tandem  # noqa: F401 - first: its import sets OMP_WAIT_POLICY before torch loads

# isort: on
# Sibling modules: `python benchmarks/engine_gpu.py` puts benchmarks/ on sys.path.
from gpu_baselines import log

from tandem.deploy.processes import free_port

REPO = Path(__file__).resolve().parents[1]


# -- 4. tandem serve + tandem bench -----------------------------------------------------------


def cli_command(*args: str) -> list[str]:
    """`tandem ARGS...` run by this interpreter, whether or not the console script exists."""
    return [sys.executable, "-m", "tandem.cli.main", *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{path}" if path else str(REPO)
    return env


class Server:
    """`tandem serve` in a subprocess; its log goes to a file and is watched for the ready
    line."""

    READY = re.compile(r"serving .* at (http://\S+)/v1")

    def __init__(self, cmd: list[str], log_path: Path) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.url: str | None = None
        self.ready = threading.Event()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env()
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.log_path, "w") as f:
            for line in self.proc.stdout:
                f.write(line)
                f.flush()
                m = self.READY.search(line)
                if m and not self.ready.is_set():
                    self.url = m.group(1)
                    self.ready.set()
        self.ready.set()  # the process ended: stop waiting

    def wait_ready(self, timeout: float) -> str:
        if not self.ready.wait(timeout) or self.url is None:
            tail = self.log_path.read_text()[-3000:] if self.log_path.exists() else ""
            raise RuntimeError(f"tandem serve did not become ready; log tail:\n{tail}")
        return self.url

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(5)
        return self.proc.returncode


def serve_flags(args: argparse.Namespace) -> list[str]:
    flags = [
        "--load-format",
        "dummy",
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--no-enable-prefix-caching",
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
        "--max-model-len",
        str(args.max_model_len),
        "--attention-backend",
        args.attention_backend,
        "--gpu-memory-utilization",
        str(args.gpu_memory_utilization),
        "--max-waiting",
        str(max(256, 2 * args.concurrent[0])),
    ]
    if args.enforce_eager:
        flags.append("--enforce-eager")
    on = args.async_scheduling != "off"
    flags.append("--async-scheduling" if on else "--no-async-scheduling")
    if args.kv_cache_gb is not None:
        flags += ["--kv-cache-memory", str(args.kv_cache_gb)]
    return flags


def bench_run(url: str, count: int, c_in: int, out: int, num: int, path: Path) -> dict:
    cmd = cli_command(
        "bench",
        "run",
        "--base-url",
        url,
        "--workload",
        "synthetic",
        "--input-len",
        str(c_in),
        "--output-len",
        str(out),
        "--concurrency",
        str(count),
        "--num-requests",
        str(num),
        "--seed",
        str(7 + num),
        "--output",
        str(path),
        "--no-plots",
        "--quiet",
    )  # bench sends ignore_eos by default: every answer is max_tokens long
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"tandem bench failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(path.read_text())


def run_serve(
    args: argparse.Namespace, folder: Path, out_dir: Path, mode: str = "embedded"
) -> dict[str, Any]:
    """`embedded`: the engine in the HTTP server's process (its step loop in a thread);
    `worker`: the engine in a `tandem worker` process, the frontend apart, over a local NATS."""
    count, c_in, c_out = args.concurrent
    port = free_port()
    nats = None
    extra: list[str] = []
    if mode == "worker":
        from tandem.deploy.processes import NatsServer

        nats = NatsServer().start()
        extra = ["--nats", nats.url]
    cmd = cli_command(
        "serve",
        str(folder),
        "--port",
        str(port),
        "--served-model-name",
        "bench-model",
        *serve_flags(args),
        *extra,
    )
    log_path = out_dir / f"engine_gpu_serve_{mode}.log"
    log(f"serve: {' '.join(cmd)} (log: {log_path})")
    started = time.perf_counter()
    server = Server(cmd, log_path)
    try:
        url = server.wait_ready(args.serve_timeout)
        ready_s = time.perf_counter() - started
        log(f"serve: ready at {url} after {ready_s:.1f} s")
        bench_run(url, count, c_in, min(16, c_out), count, out_dir / "engine_gpu_bench_warm.json")
        num = count * args.serve_rounds
        result = bench_run(url, count, c_in, c_out, num, out_dir / f"engine_gpu_bench_{mode}.json")
    finally:
        code = server.stop()
        if nats is not None:
            nats.stop()
    summary = result["summary"]
    expected = num * c_out
    req = summary["requests"]
    full_length = summary["output_tokens"] == expected and req["completed"] == num
    return {
        "command": cmd,
        "ready_s": ready_s,
        "exit_code": code,
        "requests": req,
        "output_tokens": summary["output_tokens"],
        "expected_output_tokens": expected,
        "full_length_outputs": full_length,
        "output_tok_s": summary["output_token_throughput"],
        "elapsed_s": summary["elapsed_s"],
        "ttft_ms": summary["ttft_ms"],
        "tpot_ms": summary["tpot_ms"],
        "mode": mode,
        "bench_json": str(out_dir / f"engine_gpu_bench_{mode}.json"),
    }
