"""The planner at work: every interval, what the fleet reported becomes an `Observation`, the
`Planner` decides the pool sizes, and a `Connector` makes them so.

Workers publish their engine steps (`WorkerSteps`), which train the step model of their pool;
frontends publish the requests that arrived and how the finished ones went
(`FrontendRequests`). Both come over the event plane, so the loop runs the same embedded
beside a frontend or standalone against NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tandem.planner.plan import Decision, Observation, Planner
from tandem.protocol.observations import (
    FrontendRequests,
    PlannerReport,
    RequestSample,
    WorkerSteps,
    planner_subject,
    requests_subject,
    steps_subject,
)
from tandem.runtime import EventPlane
from tandem.runtime.periodic import Periodic

log = logging.getLogger(__name__)

#: Decisions kept for inspection (metrics, benchmarks).
HISTORY = 1024
#: Finished requests one interval keeps for its lengths and percentiles.
MAX_FINISHED = 8192


class Connector(Protocol):
    """What acts on a decision: the local supervisor, an in-process cluster, Kubernetes."""

    def replicas(self) -> tuple[int, int]:
        """(prefill, decode) workers running or starting now."""
        ...

    def starting(self) -> tuple[int, int]:
        """(prefill, decode) workers asked for that do not serve yet."""
        ...

    async def scale(self, prefill: int, decode: int) -> None:
        """Start or drain workers towards these sizes (may return before they are done)."""
        ...

    def measured_startup(self) -> float | None:
        """Seconds its recent workers took from the ask to serving, if it measures them."""
        ...


@dataclass
class Tick:
    """One interval: what was seen and what was decided."""

    at: float
    seen: Observation
    decision: Decision


class PlannerLoop:
    def __init__(
        self,
        planner: Planner,
        events: EventPlane,
        connector: Connector,
        *,
        namespace: str,
        interval: float = 10.0,
    ) -> None:
        self.planner = planner
        self.connector = connector
        self._events, self._namespace = events, namespace
        self._arrived = 0
        self._finished: list[RequestSample] = []
        self._since = time.monotonic()
        self.history: deque[Tick] = deque(maxlen=HISTORY)
        self._tasks: list[asyncio.Task[None]] = []
        self._subscriptions: list = []
        self._timer = Periodic(self.tick, interval, "planner")

    async def start(self) -> None:
        steps = await self._events.subscribe(steps_subject(self._namespace), WorkerSteps)
        requests = await self._events.subscribe(requests_subject(self._namespace), FrontendRequests)
        self._since = time.monotonic()
        loop = asyncio.get_running_loop()
        self._subscriptions = [steps, requests]
        self._tasks = [loop.create_task(self._take_steps(steps)),
                       loop.create_task(self._take_requests(requests))]  # fmt: skip
        self._timer.start()

    async def stop(self) -> None:
        await self._timer.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sub in self._subscriptions:
            await sub.unsubscribe()

    async def tick(self) -> Decision:
        """Observe the interval that just ended, decide, act."""
        now = time.monotonic()
        prefill, decode = self.connector.replicas()
        seen = observation(now - self._since, self._arrived, self._finished, prefill, decode,
                           self.connector.starting())  # fmt: skip
        self._arrived, self._finished, self._since = 0, [], now
        if (startup := self.connector.measured_startup()) is not None:
            self.planner.plan_ahead(startup, self._timer.interval)
        decision = self.planner.step(seen)
        self.history.append(Tick(now, seen, decision))
        report = PlannerReport(
            observed_rate=seen.requests / seen.seconds if seen.seconds > 0 else 0.0,
            forecast_rate=decision.forecast_rate, prefill_replicas=decision.prefill_replicas,
            decode_replicas=decision.decode_replicas, reasons=decision.reasons,
            aggregated=self.planner.config.prefill.max_replicas == 0,
        )  # fmt: skip
        try:
            await self._events.publish(planner_subject(self._namespace), report)
        except Exception as exc:  # the event plane down: plan on, unreported
            log.warning("planner: could not publish its decision: %s", exc)
        if (decision.prefill_replicas, decision.decode_replicas) != (prefill, decode):
            why = "; ".join(decision.reasons) or "forecast"
            log.info("planner: %.1f requests/s forecast; prefill %d -> %d, decode %d -> %d (%s)",
                     decision.forecast_rate or 0, prefill, decision.prefill_replicas, decode,
                     decision.decode_replicas, why)  # fmt: skip
            await self.connector.scale(decision.prefill_replicas, decision.decode_replicas)
        return decision

    async def _take_steps(self, sub) -> None:
        p = self.planner
        by_role = {"prefill": {p.model}, "decode": {p.decode_model}}
        async for report in sub:
            for model in by_role.get(report.role, {p.model, p.decode_model}):
                for step in report.steps:
                    model.add_step(step)

    async def _take_requests(self, sub) -> None:
        async for report in sub:
            self._arrived += report.arrived
            room = MAX_FINISHED - len(self._finished)
            self._finished.extend(report.finished[: max(0, room)])


def observation(
    seconds: float,
    arrived: int,
    finished: list[RequestSample],
    prefill: int,
    decode: int,
    starting: tuple[int, int] = (0, 0),
) -> Observation:
    """An interval's `Observation`: uncached prompt lengths, output lengths, and the p90 of
    time to first token and of each request's mean inter-token latency."""
    ttfts = [r.ttft_s for r in finished if r.ttft_s is not None]
    itls = [r.itl_s for r in finished if r.itl_s is not None]
    return Observation(
        seconds=seconds,
        requests=arrived,
        prompt_tokens=[max(0, r.prompt_tokens - r.cached_tokens) for r in finished],
        output_tokens=[r.output_tokens for r in finished],
        ttft_p90_s=float(np.quantile(ttfts, 0.9)) if ttfts else None,
        itl_p90_s=float(np.quantile(itls, 0.9)) if itls else None,
        itl_p50_s=float(np.quantile(itls, 0.5)) if itls else None,
        prefill_replicas=prefill,
        decode_replicas=decode,
        prefill_starting=starting[0],
        decode_starting=starting[1],
    )
