"""The SLA planner at work over NATS: `run_planner`, with a connector that acts on the pools
(`ProcessScaler` for the local supervisor's worker processes, `KubernetesScaler` for
Deployments).

Beside the supervisor (`tandem serve ... --planner`, `tandem planner --connector local`) it
runs on a thread of its own (`PlannerThread`): the supervisor's main thread polls its
children, the planner needs an event loop to hear the workers' steps and the frontends'
requests. `ProcessScaler` counts a worker as serving once its instance id appears in
discovery, so the planner knows which of the workers it asked for are still starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from typing import Any

from tandem.deploy.supervisor import Supervisor
from tandem.planner.loop import PlannerLoop
from tandem.planner.plan import Planner
from tandem.protocol.worker import GENERATE_ENDPOINT, WORKER_COMPONENT
from tandem.runtime import Discovery, event_loop

log = logging.getLogger("tandem.planner")
POOLS = ("prefill", "decode")  # the supervisor's roles behind the planner's two pools
#: Seconds before the planner starts over after its loop failed (NATS unreachable, ...).
RETRY_S = 5.0
#: Start-ups remembered: the planner plans as far ahead as the longest of them.
STARTUPS = 8


class ProcessScaler:
    """A `Connector` over a `Supervisor`'s worker processes. `pools`: the supervisor's roles
    behind the planner's prefill and decode pools; an aggregated pool is the decode pool
    with no prefill pool (None)."""

    def __init__(
        self, supervisor: Supervisor, pools: tuple[str | None, str] = POOLS
    ) -> None:
        self.supervisor, self.pools = supervisor, pools
        self.serving: set[str] = set()  # instance ids registered in discovery
        self.startups: deque[float] = deque(maxlen=STARTUPS)  # seconds, spawn to discovery

    def measured_startup(self) -> float | None:
        """The longest of the recent start-ups (None before one): how far ahead to plan."""
        return max(self.startups, default=None)

    def replicas(self) -> tuple[int, int]:
        prefill, decode = (self._size(role) for role in self.pools)
        return prefill, decode

    def starting(self) -> tuple[int, int]:
        prefill, decode = (self._starting(role) for role in self.pools)
        return prefill, decode

    def _size(self, role: str | None) -> int:
        return 0 if role is None else self.supervisor.size(role)

    def _starting(self, role: str | None) -> int:
        if role is None:
            return 0
        ids = self.supervisor.instance_ids(role)
        return max(0, self.supervisor.size(role) - sum(i in self.serving for i in ids))

    async def scale(self, prefill: int, decode: int) -> None:
        for role, n in zip(self.pools, (prefill, decode), strict=True):
            if role is not None:
                self.supervisor.want(role, n)

    async def follow(self, discovery: Discovery, namespace: str) -> None:
        """Keep `serving` current from discovery, until cancelled."""
        prefix = f"{namespace}.{WORKER_COMPONENT}.{GENERATE_ENDPOINT}"
        async with contextlib.aclosing(discovery.watch(prefix)) as events:
            async for event in events:
                iid = event.instance.instance_id
                if event.kind == "removed":
                    self.serving.discard(iid)
                elif iid not in self.serving:  # (a serving worker's new card is no start)
                    self.serving.add(iid)
                    if (startup := self.supervisor.serves(iid)) is not None:
                        self.startups.append(startup)


class PlannerThread:
    """`run_planner` on its own thread and event loop (beside a supervisor's polling)."""

    def __init__(self, connector: Any, planner: Planner, nats_url: str, *, namespace: str,
                 interval: float) -> None:  # fmt: skip
        self.connector, self.planner = connector, planner
        self.nats_url, self.namespace, self.interval = nats_url, namespace, interval
        self._thread = threading.Thread(target=self._run, name="planner", daemon=True)
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self._event_loop is not None and self._stop is not None:
            self._event_loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def _run(self) -> None:
        event_loop.run(self._main())

    async def _main(self) -> None:
        self._event_loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        await run_planner(self.connector, self.planner, self.nats_url, self._stop,
                          namespace=self.namespace, interval=self.interval)  # fmt: skip


async def run_planner(
    connector: Any,
    planner: Planner,
    nats_url: str,
    stop: asyncio.Event,
    *,
    namespace: str,
    interval: float,
) -> None:
    """The planner loop over NATS until `stop` is set, acting through `connector` (which
    also has `follow(discovery, namespace)`, run meanwhile to keep its view of the pools);
    a failure is logged and the loop starts over after RETRY_S."""
    while not stop.is_set():
        try:
            await _plan(connector, planner, nats_url, stop, namespace, interval)
        except Exception:
            log.exception("planner: its loop failed; starting over in %.0f s", RETRY_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_S)


async def _plan(connector: Any, planner: Planner, nats_url: str, stop: asyncio.Event,
                namespace: str, interval: float) -> None:  # fmt: skip
    from tandem.runtime.nats_discovery import NatsDiscovery
    from tandem.runtime.nats_event_plane import NatsEventPlane

    discovery = await NatsDiscovery.connect(nats_url)
    events = await NatsEventPlane.connect(nats_url)
    follow = asyncio.ensure_future(connector.follow(discovery, namespace))
    loop = PlannerLoop(planner, events, connector, namespace=namespace, interval=interval)
    try:
        await loop.start()
        c = planner.config
        log.info("planner: every %g s, targets TTFT %g s and ITL %g s (p90)",
                 interval, c.ttft_s, c.itl_s)  # fmt: skip
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([stopped, follow], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if follow.done():
            follow.result()  # the connector's watch failed: raise it
            raise RuntimeError("the connector's watch ended")
    finally:
        follow.cancel()
        await loop.stop()
        await events.close()
        await discovery.close()
