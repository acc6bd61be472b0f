"""The local multi-process supervisor behind `tandem serve MODEL --workers N` (or
`--prefill-workers P --decode-workers D`): distributed mode on one machine.

It starts a local nats-server (unless given a NATS URL), one child per worker spec and one for
each frontend spec (`python -m tandem.deploy.child KIND`, the spec on its stdin), and supervises
them: a worker that exits on its own (a crash, or its engine died: it exits non-zero after
leaving discovery) is restarted after a backoff of 1, 2, 4, ... seconds (capped); a worker
that keeps dying (MAX_RESTARTS restarts without HEALTHY_SECONDS of uptime in between) stops
everything, rather than serving on with fewer workers than asked for; a worker that stayed up
HEALTHY_SECONDS has its restart budget reset. A frontend exiting stops everything.
SIGTERM or Ctrl-C stops the children with SIGTERM (workers drain), waits, then SIGKILLs what
is left.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType

from tandem.deploy.processes import NatsServer, die_with_parent
from tandem.deploy.specs import FrontendSpec, WorkerSpec, encode

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


class Supervisor:
    """The child processes of one local deployment: workers and frontends (several share one
    port, each with its own router fed by the same KV events)."""

    def __init__(
        self,
        workers: list[WorkerSpec],
        frontends: list[FrontendSpec],
        *,
        drain_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.worker_specs = workers
        self.frontend_specs = frontends
        self.roles = [w.role for w in workers]
        self.drain_timeout = drain_timeout
        self._clock = clock
        self.workers: list[subprocess.Popen[bytes]] = []
        self.restarts = [0] * len(self.roles)
        self.started = [0.0] * len(self.roles)  # when each worker was (re)started
        self.restart_at: dict[int, float] = {}  # exited workers waiting out their backoff
        self.frontends: list[subprocess.Popen[bytes]] = []

    def _spawn_worker(self, i: int) -> subprocess.Popen[bytes]:
        self.started[i] = self._clock()
        return self._spawn("worker", self.worker_specs[i])

    @staticmethod
    def backoff(restart: int) -> float:
        """Seconds to wait before the `restart`-th restart in a row (1-based)."""
        return min(MAX_BACKOFF, RESTART_BACKOFF * 2 ** (restart - 1))

    def start(self) -> None:
        self.workers = [self._spawn_worker(i) for i in range(len(self.roles))]
        self.frontends = [self._spawn("frontend", spec) for spec in self.frontend_specs]
        log.info(
            "started %s and %d frontend(s) against %s",
            ", ".join(f"{self.roles.count(r)} {r} worker(s)" for r in dict.fromkeys(self.roles)),
            len(self.frontends),
            self.frontend_specs[0].nats,
        )

    def _spawn(self, kind: str, spec: WorkerSpec | FrontendSpec) -> subprocess.Popen[bytes]:
        """The child reads its spec from the pipe (a command line is visible to others)."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.deploy.child", kind],
            stdin=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        assert proc.stdin is not None
        with proc.stdin:
            proc.stdin.write(encode(spec))
        return proc

    def check(self) -> int | None:
        """Restart crashed workers; the exit status to stop with, or None to keep going."""
        assert self.frontends
        for proc in self.frontends:
            if (code := proc.poll()) is not None:
                log.error("a frontend exited with status %s; stopping", code)
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
        procs = [*self.frontends, *self.workers]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_timeout + STOP_SLACK
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()


def run_local(
    specs_for: Callable[[str], tuple[list[WorkerSpec], list[FrontendSpec]]],
    nats_url: str | None = None,
    drain_timeout: float = 30.0,
) -> int:
    """Run until SIGTERM / Ctrl-C or a fatal child failure; return the exit status.
    `specs_for(nats_url)` gives the children's specs once NATS is up (started here when
    `nats_url` is None)."""
    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    nats: NatsServer | None = None
    supervisor: Supervisor | None = None
    status = 0
    try:
        if nats_url is None:
            nats = NatsServer().start()
            nats_url = nats.url
            log.info("started nats-server at %s", nats_url)
        workers, frontends = specs_for(nats_url)
        supervisor = Supervisor(workers, frontends, drain_timeout=drain_timeout)
        supervisor.start()
        while not stopping:
            code = supervisor.check()
            if code is not None:
                status = code
                break
            time.sleep(0.2)
        if stopping:
            log.info("signal %d: stopping workers and frontend", stopping[0])
    finally:
        if supervisor is not None:
            supervisor.stop()
        if nats is not None:
            nats.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status
