"""`ClusterScaler`: the planner's connector for an in-process `LocalCluster`.

A new worker holds its GPU from the moment it is asked for: it comes up after `startup_s`
(loading weights, capturing graphs: a real engine's time, modelled for mock engines), and
only then joins the frontend's pool. A worker that is no longer wanted drains (it leaves
discovery at once; its streams finish within `grace` or migrate), so scaling down loses no
request. Worker-seconds count from the ask to the end of the drain: what the GPUs were held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from tandem.deploy.cluster import LocalCluster
from tandem.protocol.worker import Role
from tandem.worker import Worker

log = logging.getLogger(__name__)

POOLS: tuple[Role, Role] = ("prefill", "decode")


class ClusterScaler:
    def __init__(
        self,
        cluster: LocalCluster,
        make_engine: Callable[[Role], Any],
        *,
        startup_s: float = 0.0,
        grace: float = 30.0,
    ) -> None:
        self.cluster = cluster
        self.make_engine = make_engine
        self.startup_s, self.grace = startup_s, grace
        now = time.monotonic()
        self._held: dict[Worker, float] = {w: now for w in cluster.workers}  # since when
        self._starting: dict[Role, list[tuple[asyncio.Task[None], float]]] = {p: [] for p in POOLS}
        self._draining: set[Worker] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._released_s = 0.0  # worker-seconds of workers gone

    def replicas(self) -> tuple[int, int]:
        prefill, decode = (len(self._live(p)) + len(self._starting[p]) for p in POOLS)
        return prefill, decode

    def starting(self) -> tuple[int, int]:
        prefill, decode = (len(self._starting[p]) for p in POOLS)
        return prefill, decode

    async def scale(self, prefill: int, decode: int) -> None:
        for pool, want in zip(POOLS, (prefill, decode), strict=True):
            have = len(self._live(pool)) + len(self._starting[pool])
            for _ in range(want - have):
                self._spawn_start(pool)
            for _ in range(have - want):
                if self._starting[pool]:  # not up yet: the cheapest to give back
                    task, _ = self._starting[pool][-1]
                    task.cancel()
                else:
                    worker = self._live(pool)[-1]
                    self._draining.add(worker)
                    self._background(self._drain(worker))

    def measured_startup(self) -> None:
        """Its start-up is modelled (`startup_s`), not measured."""
        return None

    def worker_seconds(self) -> float:
        """GPU-seconds held so far: by every worker, from its ask to its drain's end."""
        now = time.monotonic()
        held = sum(now - since for since in self._held.values())
        starting = sum(now - since for tasks in self._starting.values() for _, since in tasks)
        return self._released_s + held + starting

    async def close(self) -> None:
        """Cancel the starts and wait for the drains under way."""
        for tasks in self._starting.values():
            for task, _ in tasks:
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _live(self, pool: Role) -> list[Worker]:
        return [w for w, role in zip(self.cluster.workers, self.cluster.roles, strict=True)
                if role == pool and w not in self._draining]  # fmt: skip

    def _spawn_start(self, pool: Role) -> None:
        asked = time.monotonic()
        self._starting[pool].append((self._background(self._start(pool, asked)), asked))

    async def _start(self, pool: Role, asked: float) -> None:
        try:
            await asyncio.sleep(self.startup_s)
            engine = await asyncio.to_thread(self.make_engine, pool)
            worker = await self.cluster.add_worker(engine, pool)
            self._held[worker] = asked
        except asyncio.CancelledError:
            self._released_s += time.monotonic() - asked
            raise
        finally:
            me = asyncio.current_task()
            self._starting[pool] = [(t, s) for t, s in self._starting[pool] if t is not me]

    async def _drain(self, worker: Worker) -> None:
        try:
            engine = await self.cluster.remove_worker(worker, self.grace)
            await asyncio.to_thread(engine.shutdown)
        finally:
            self._draining.discard(worker)
            self._released_s += time.monotonic() - self._held.pop(worker, time.monotonic())

    def _background(self, coro) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)
        return task


def _log_failure(task: asyncio.Task[None]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        if (exc := task.exception()) is not None:
            log.error("scaling a worker failed: %r", exc)
