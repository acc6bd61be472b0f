"""`tandem serve MODEL --workers N` (or `--prefill-workers P --decode-workers D`): distributed
mode on one machine.

Starts a local nats-server (unless `--nats` names one), N `tandem worker` processes (or P with
`--role prefill` and D with `--role decode`) and a `tandem frontend` process, and supervises
them: a worker that exits on its own (a crash, or its engine died: it exits non-zero after
leaving discovery) is restarted after a backoff of 1, 2, 4, ... seconds (capped); a worker
that keeps dying (MAX_RESTARTS restarts without HEALTHY_SECONDS of uptime in between) stops
everything, rather than serving on with fewer workers than asked for; a worker that stayed up
HEALTHY_SECONDS has its restart budget reset. The frontend exiting stops everything.
SIGTERM or Ctrl-C stops the children with SIGTERM (workers drain), waits, then SIGKILLs what
is left.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from tandem.cli.distributed import frontend_argv, router_argv
from tandem.runtime.testing import die_with_parent

log = logging.getLogger("tandem.launcher")

MAX_RESTARTS = 3
#: Delay before a worker's k-th restart in a row: RESTART_BACKOFF * 2**(k-1), at most
#: MAX_BACKOFF seconds.
RESTART_BACKOFF = 1.0
MAX_BACKOFF = 30.0
#: A worker up this long is healthy again: its restart budget starts over.
HEALTHY_SECONDS = 60.0
#: Seconds given to children after SIGTERM beyond the workers' drain timeout.
STOP_SLACK = 5.0


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine and mock flags of `args`, as `tandem worker` arguments."""
    argv = [
        "--dtype", args.dtype,
        "--seed", str(args.seed),
        "--block-size", str(args.block_size),
        "--max-num-seqs", str(args.max_num_seqs),
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--engine", args.engine,
        "--mock-speedup", str(args.mock_speedup),
        "--kv-export-ttl", str(args.kv_export_ttl),
        "--gpu-memory-utilization", str(args.gpu_memory_utilization),
        "--attention-backend", args.attention_backend,
        "--load-format", args.load_format,
        "--enable-prefix-caching" if args.enable_prefix_caching else "--no-enable-prefix-caching",
    ]  # fmt: skip
    if args.enforce_eager:
        argv.append("--enforce-eager")
    if args.async_scheduling is not None:
        argv.append("--async-scheduling" if args.async_scheduling else "--no-async-scheduling")
    optional = {
        "--device": args.device,
        "--max-model-len": args.max_model_len,
        "--num-gpu-blocks": args.num_gpu_blocks,
        "--kv-cache-memory": args.kv_cache_memory,
        "--perf-model": args.perf_model,
    }
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    return argv


class Cluster:
    """The child processes of one `tandem serve --workers N` (or P prefill + D decode)."""

    def __init__(
        self,
        args: argparse.Namespace,
        model_path: Path,
        served: str,
        nats_url: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.args = args
        self._clock = clock
        self.nats_url = nats_url
        if args.prefill_workers:
            self.roles = ["prefill"] * args.prefill_workers + ["decode"] * args.decode_workers
        else:
            self.roles = ["aggregated"] * args.workers
        decode_workers = args.decode_workers or args.workers
        base = [sys.executable, "-m", "tandem.cli.main"]
        self.worker_cmd = [
            *base, "worker", str(model_path),
            "--nats", nats_url,
            "--served-model-name", served,
            "--log-level", args.log_level,
            "--drain-timeout", str(args.drain_timeout),
            *engine_argv(args),
        ]  # fmt: skip
        self.frontend_cmd = [
            *base, "frontend",
            "--nats", nats_url,
            "--host", args.host,
            "--port", str(args.port),
            "--served-model-name", served,
            "--tokenizer", str(model_path),
            "--max-waiting", str(args.max_waiting),
            "--max-request-bytes", str(args.max_request_bytes),
            "--max-client-rate", str(args.max_client_rate),
            "--min-workers", str(decode_workers),
            "--min-prefill-workers", str(args.prefill_workers or 0),
            "--log-level", args.log_level,
            *router_argv(args),
            *frontend_argv(args),
        ]  # fmt: skip
        # The API key travels in the environment, not on a command line others can read.
        self.env = dict(os.environ)
        self.env.pop("TANDEM_API_KEY", None)
        if args.api_key:
            self.env["TANDEM_API_KEY"] = args.api_key
        self.workers: list[subprocess.Popen[bytes]] = []
        self.restarts = [0] * len(self.roles)
        self.started = [0.0] * len(self.roles)  # when each worker was (re)started
        self.restart_at: dict[int, float] = {}  # exited workers waiting out their backoff
        self.frontend: subprocess.Popen[bytes] | None = None

    def _spawn_worker(self, i: int) -> subprocess.Popen[bytes]:
        self.started[i] = self._clock()
        return self._spawn([*self.worker_cmd, "--role", self.roles[i]])

    @staticmethod
    def backoff(restart: int) -> float:
        """Seconds to wait before the `restart`-th restart in a row (1-based)."""
        return min(MAX_BACKOFF, RESTART_BACKOFF * 2 ** (restart - 1))

    def start(self) -> None:
        self.workers = [self._spawn_worker(i) for i in range(len(self.roles))]
        self.frontend = self._spawn(self.frontend_cmd)
        log.info(
            "started %s and a frontend against %s",
            ", ".join(f"{self.roles.count(r)} {r} worker(s)" for r in dict.fromkeys(self.roles)),
            self.nats_url,
        )

    def _spawn(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, env=self.env, preexec_fn=die_with_parent
        )

    def check(self) -> int | None:
        """Restart crashed workers; the exit status to stop with, or None to keep going."""
        assert self.frontend is not None
        if (code := self.frontend.poll()) is not None:
            log.error("the frontend exited with status %s; stopping", code)
            return 1
        now = self._clock()
        for i, proc in enumerate(self.workers):
            if i in self.restart_at:
                if now >= self.restart_at[i]:
                    del self.restart_at[i]
                    self.workers[i] = self._spawn_worker(i)
                continue
            code = proc.poll()
            if code is None:
                if self.restarts[i] and now - self.started[i] >= HEALTHY_SECONDS:
                    self.restarts[i] = 0  # healthy again: a later crash starts a fresh budget
                continue
            if now - self.started[i] >= HEALTHY_SECONDS:
                self.restarts[i] = 0
            if self.restarts[i] >= MAX_RESTARTS:
                log.error(
                    "worker %d (%s) exited with status %s after %d restarts; stopping",
                    i,
                    self.roles[i],
                    code,
                    self.restarts[i],
                )
                return 1
            self.restarts[i] += 1
            delay = self.backoff(self.restarts[i])
            log.warning(
                "worker %d (%s) exited with status %s; restarting it in %.0f s (%d/%d)",
                i,
                self.roles[i],
                code,
                delay,
                self.restarts[i],
                MAX_RESTARTS,
            )
            self.restart_at[i] = now + delay
        return None

    def stop(self) -> None:
        """SIGTERM everyone, wait (workers drain), SIGKILL the rest."""
        procs = [p for p in [self.frontend, *self.workers] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.args.drain_timeout + STOP_SLACK
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()


def run_cluster(args: argparse.Namespace, model_path: Path, served: str) -> int:
    """Run until SIGTERM / Ctrl-C or a fatal child failure; return the exit status."""
    from tandem.runtime.testing import NatsServer

    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    nats: NatsServer | None = None
    cluster: Cluster | None = None
    status = 0
    try:
        url = args.nats
        if url is None:
            nats = NatsServer().start()
            url = nats.url
            log.info("started nats-server at %s", url)
        cluster = Cluster(args, model_path, served, url)
        cluster.start()
        while not stopping:
            code = cluster.check()
            if code is not None:
                status = code
                break
            time.sleep(0.2)
        if stopping:
            log.info("signal %d: stopping workers and frontend", stopping[0])
    finally:
        if cluster is not None:
            cluster.stop()
        if nats is not None:
            nats.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status
