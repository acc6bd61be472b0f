"""`Periodic`: a coroutine run every `interval` seconds in a task of its own, until stopped.

What reports on a timer (a worker's load and KV events, a frontend's requests, the planner's
intervals) must keep going through a failed round: a failure is logged, and the next round
comes as usual."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Periodic:
    def __init__(self, tick: Callable[[], Awaitable[object]], interval: float, name: str) -> None:
        self.tick, self.interval, self.name = tick, interval, name
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except Exception:  # one failed round must not end the reports
                log.exception("%s failed", self.name)
