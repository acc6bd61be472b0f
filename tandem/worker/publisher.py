"""Publishes a worker's KV events and load on the event plane.

The engine's step loop runs in a thread and must never wait for the network, so it only
buffers: this task drains the buffer every `interval` (100 ms by default) and publishes one
`KvEventBatch` when there are events, and a `WorkerLoad` when the figures changed or
`heartbeat` seconds passed (so a router that starts late learns the load within a second),
and the engine's steps since the last report for the planner (`WorkerSteps`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tandem.protocol import KvEvent, LoadStats
from tandem.protocol.observations import StepSample, WorkerSteps, steps_subject
from tandem.protocol.worker import KvEventBatch, WorkerLoad, kv_events_subject, load_subject
from tandem.runtime import EventPlane
from tandem.runtime.periodic import Periodic


class LoadPublisher:
    def __init__(
        self,
        events: EventPlane,
        namespace: str,
        worker_id: str,
        stats: Callable[[], LoadStats],
        take_kv_events: Callable[[], list[KvEvent]],
        *,
        take_steps: Callable[[], list[StepSample]] | None = None,
        role: str = "aggregated",
        interval: float = 0.1,
        heartbeat: float = 1.0,
    ) -> None:
        self._events = events
        self._take_steps = take_steps
        self._role = role
        self._steps_subject = steps_subject(namespace, worker_id)
        self._worker_id = worker_id
        self._stats = stats
        self._take_kv_events = take_kv_events
        self._load_subject = load_subject(namespace, worker_id)
        self._kv_subject = kv_events_subject(namespace, worker_id)
        self.heartbeat = heartbeat
        self._last: LoadStats | None = None
        self._last_time = 0.0
        self._timer = Periodic(self.publish_once, interval, "load-publisher")

    def start(self) -> None:
        self._timer.start()

    async def stop(self) -> None:
        """Stop the loop and publish what is left, so the last events are not lost."""
        await self._timer.stop()
        await self.publish_once(force=True)

    async def publish_once(self, force: bool = False) -> None:
        events = self._take_kv_events()
        if events:
            await self._events.publish(
                self._kv_subject, KvEventBatch(worker_id=self._worker_id, events=events)
            )
        steps = self._take_steps() if self._take_steps is not None else None
        if steps:
            await self._events.publish(
                self._steps_subject,
                WorkerSteps(worker_id=self._worker_id, role=self._role, steps=steps),
            )
        stats = self._stats()
        now = time.monotonic()
        if force or stats != self._last or now - self._last_time >= self.heartbeat:
            await self._events.publish(
                self._load_subject, WorkerLoad(worker_id=self._worker_id, stats=stats)
            )
            self._last, self._last_time = stats, now
