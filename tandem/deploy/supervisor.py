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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import msgspec

from tandem.deploy.processes import NatsServer, die_with_parent
from tandem.deploy.specs import FrontendSpec, WorkerSpec, encode
from tandem.runtime.addressing import new_instance_id

log = logging.getLogger("tandem.launcher")

MAX_RESTARTS = 3
#: A child's exit status for a configuration it cannot run (a bad flag, a model it cannot
#: load, an engine that refuses its settings): restarting would fail the same way.
CONFIG_ERROR = 2
#: Delay before a worker's k-th restart in a row: RESTART_BACKOFF * 2**(k-1), at most
#: MAX_BACKOFF seconds.
RESTART_BACKOFF = 1.0
MAX_BACKOFF = 30.0
#: A worker up this long is healthy again: its restart budget starts over.
HEALTHY_SECONDS = 60.0
#: Seconds given to children after SIGTERM beyond the workers' drain timeout.
STOP_SLACK = 5.0


@dataclass
class WorkerSlot:
    """One worker the deployment wants: its spec and its current process."""

    spec: WorkerSpec
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0  # when its process was (re)started
    restarts: int = 0  # in a row, without a healthy period
    restart_at: float | None = None  # it exited: respawn then (after its backoff)
    retire_by: float | None = None  # told to drain: killed if still running then
    served: bool = False  # seen serving since its process started


class Supervisor:
    """The child processes of one local deployment: workers and frontends (several share one
    port, each with its own router fed by the same KV events).

    The worker pools can be resized while it runs (`want`, from any thread: the planner's
    connector): a new worker starts from its pool's first spec under a fresh instance id; one
    no longer wanted drains (SIGTERM) and is not restarted."""

    def __init__(
        self,
        workers: list[WorkerSpec],
        frontends: list[FrontendSpec],
        *,
        drain_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.slots = [WorkerSlot(_with_id(spec)) for spec in workers]
        self.templates = {s.spec.role: s.spec for s in reversed(self.slots)}
        self.frontend_specs = frontends
        self.drain_timeout = drain_timeout
        self._clock = clock
        self.frontends: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._wanted: dict[str, int] = {}

    @staticmethod
    def backoff(restart: int) -> float:
        """Seconds to wait before the `restart`-th restart in a row (1-based)."""
        return min(MAX_BACKOFF, RESTART_BACKOFF * 2 ** (restart - 1))

    def start(self) -> None:
        for slot in self.slots:
            self._spawn_worker(slot)
        self.frontends = [self._spawn("frontend", spec) for spec in self.frontend_specs]
        roles = [slot.spec.role for slot in self.slots]
        log.info(
            "started %s and %d frontend(s) against %s",
            ", ".join(f"{roles.count(r)} {r} worker(s)" for r in dict.fromkeys(roles)),
            len(self.frontends),
            self.frontend_specs[0].nats if self.frontend_specs else self.slots[0].spec.nats,
        )

    # -- pool sizes (any thread) ---------------------------------------------------------

    def want(self, role: str, n: int) -> None:
        """Resize `role`'s pool to `n` workers at the next `check`."""
        if role not in self.templates:
            raise ValueError(f"no {role} worker to copy: the deployment has none")
        with self._lock:
            self._wanted[role] = n

    def size(self, role: str) -> int:
        """`role`'s workers asked for: running or starting, not draining."""
        with self._lock:
            if role in self._wanted:
                return self._wanted[role]
            return sum(s.spec.role == role and s.retire_by is None for s in self.slots)

    def instance_ids(self, role: str) -> list[str]:
        """The discovery ids of `role`'s workers, running or starting (not draining)."""
        with self._lock:
            return [s.spec.instance_id or "" for s in self.slots
                    if s.spec.role == role and s.retire_by is None]  # fmt: skip

    def serves(self, instance_id: str) -> float | None:
        """That worker was seen serving: its start-up in seconds, the first time since its
        process was (re)started; None after that, or if it is not ours."""
        with self._lock:
            for slot in self.slots:
                if slot.spec.instance_id == instance_id and not slot.served:
                    slot.served = True
                    return self._clock() - slot.started
        return None

    def _resize(self) -> None:
        with self._lock:
            wanted, self._wanted = self._wanted, {}
            for role, n in wanted.items():
                pool = [s for s in self.slots if s.spec.role == role and s.retire_by is None]
                for _ in range(n - len(pool)):
                    slot = WorkerSlot(_with_id(self.templates[role], fresh=True))
                    self.slots.append(slot)
                    self._spawn_worker(slot)
                for slot in reversed(pool[n:]):  # the newest go first
                    self._retire(slot)
                if n != len(pool):
                    log.info("%s workers: %d -> %d", role, len(pool), n)

    def _retire(self, slot: WorkerSlot) -> None:
        slot.retire_by = self._clock() + self.drain_timeout + STOP_SLACK
        if slot.restart_at is None and slot.proc is not None and slot.proc.poll() is None:
            slot.proc.send_signal(signal.SIGTERM)  # it drains, then exits

    # -- processes -------------------------------------------------------------------------

    def _spawn_worker(self, slot: WorkerSlot) -> None:
        slot.started, slot.restart_at, slot.served = self._clock(), None, False
        slot.proc = self._spawn("worker", slot.spec)

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
        """Resize the pools, restart crashed workers, forget drained ones; the exit status to
        stop with, or None to keep going."""
        for proc in self.frontends:
            if (code := proc.poll()) is not None:
                log.error("a frontend exited with status %s; stopping", code)
                return 1
        self._resize()
        now = self._clock()
        for slot in list(self.slots):
            if slot.retire_by is not None:
                self._check_retiring(slot, now)
            elif self._check_worker(slot, now) is not None:
                return 1
        return None

    def _check_retiring(self, slot: WorkerSlot, now: float) -> None:
        assert slot.proc is not None and slot.retire_by is not None
        if slot.restart_at is None and slot.proc.poll() is None:
            if now < slot.retire_by:
                return
            log.warning("worker %s did not drain in time; killing it", slot.spec.instance_id)
            slot.proc.kill()
            slot.proc.wait()
        with self._lock:
            self.slots.remove(slot)

    def _check_worker(self, slot: WorkerSlot, now: float) -> int | None:
        assert slot.proc is not None
        role = slot.spec.role
        if slot.restart_at is not None:
            if now >= slot.restart_at:
                self._spawn_worker(slot)
            return None
        code = slot.proc.poll()
        if code is None:
            if slot.restarts and now - slot.started >= HEALTHY_SECONDS:
                slot.restarts = 0  # healthy again: a later crash starts a fresh budget
            return None
        if code == CONFIG_ERROR:
            log.error("worker %s (%s) cannot run as configured (status %d, its error above);"
                      " stopping", slot.spec.instance_id, role, code)  # fmt: skip
            return 1
        if now - slot.started >= HEALTHY_SECONDS:
            slot.restarts = 0
        if slot.restarts >= MAX_RESTARTS:
            log.error("worker %s (%s) exited with status %s after %d restarts; stopping",
                      slot.spec.instance_id, role, code, slot.restarts)  # fmt: skip
            return 1
        slot.restarts += 1
        delay = self.backoff(slot.restarts)
        log.warning(
            "worker %s (%s) exited with status %s; restarting it in %.0f s (%d/%d)",
            slot.spec.instance_id, role, code, delay, slot.restarts, MAX_RESTARTS,
        )  # fmt: skip
        slot.restart_at = now + delay
        return None

    def stop(self) -> None:
        """SIGTERM everyone, wait (workers drain), SIGKILL the rest."""
        procs = [*self.frontends, *(s.proc for s in self.slots if s.proc is not None)]
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


def _with_id(spec: WorkerSpec, fresh: bool = False) -> WorkerSpec:
    """`spec` with an instance id of its own (so a connector can tell when it serves)."""
    if spec.instance_id is not None and not fresh:
        return spec
    return msgspec.structs.replace(spec, instance_id=new_instance_id())


def run_local(
    specs_for: Callable[[str], tuple[list[WorkerSpec], list[FrontendSpec]]],
    nats_url: str | None = None,
    drain_timeout: float = 30.0,
    planner: Callable[[Supervisor, str], Any] | None = None,
) -> int:
    """Run until SIGTERM / Ctrl-C or a fatal child failure; return the exit status.
    `specs_for(nats_url)` gives the children's specs once NATS is up (started here when
    `nats_url` is None); `planner(supervisor, nats_url)`, when given, makes what resizes the
    pools (started after the children, stopped before them)."""
    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    nats: NatsServer | None = None
    supervisor: Supervisor | None = None
    planning = None
    status = 0
    try:
        if nats_url is None:
            nats = NatsServer().start()
            nats_url = nats.url
            log.info("started nats-server at %s", nats_url)
        workers, frontends = specs_for(nats_url)
        supervisor = Supervisor(workers, frontends, drain_timeout=drain_timeout)
        supervisor.start()
        if planner is not None:
            planning = planner(supervisor, nats_url)
            planning.start()
        while not stopping:
            code = supervisor.check()
            if code is not None:
                status = code
                break
            time.sleep(0.2)
        if stopping:
            log.info("signal %d: stopping the workers and frontends", stopping[0])
    finally:
        if planning is not None:
            planning.stop()
        if supervisor is not None:
            supervisor.stop()
        if nats is not None:
            nats.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status
