"""What a frontend tells the planner: how many requests arrived, and how the finished ones
went (lengths, time to first token, inter-token latency), published every `interval`; and
what the planner tells the frontends (its last decision, exported as metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator

from tandem.protocol import GenerateOutput, GenerateRequest
from tandem.protocol.observations import (
    FrontendRequests,
    PlannerReport,
    RequestSample,
    planner_subject,
    requests_subject,
)
from tandem.runtime import EventPlane
from tandem.runtime.periodic import Periodic

#: Finished requests kept between two reports; past it the oldest go (a sample suffices).
MAX_SAMPLES = 2048


class RequestReporter:
    def __init__(
        self, events: EventPlane, namespace: str, frontend_id: str, interval: float = 1.0
    ) -> None:
        self._events = events
        self._subject = requests_subject(namespace, frontend_id)
        self.frontend_id = frontend_id
        self._arrived = 0
        self._finished: deque[RequestSample] = deque(maxlen=MAX_SAMPLES)
        self._timer = Periodic(self.publish_once, interval, "request-reports")

    async def observe(
        self, request: GenerateRequest, outputs: AsyncIterator[GenerateOutput]
    ) -> AsyncIterator[GenerateOutput]:
        """`outputs`, passed through, timed: counted as arrived now, sampled when it ends."""
        self._arrived += 1
        started = time.perf_counter()
        first = last = None
        tokens = cached = 0
        try:
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    if out.token_ids:
                        last = time.perf_counter()
                        first = first or last
                        tokens += len(out.token_ids)
                    cached = max(cached, out.num_cached_tokens)
                    yield out
        finally:
            gaps = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
            self._finished.append(RequestSample(
                len(request.prompt_token_ids), cached, tokens,
                None if first is None else first - started, gaps,
            ))  # fmt: skip

    def start(self) -> None:
        self._timer.start()

    async def stop(self) -> None:
        await self._timer.stop()

    async def publish_once(self) -> None:
        if not self._arrived and not self._finished:
            return
        report = FrontendRequests(frontend_id=self.frontend_id, arrived=self._arrived,
                                  finished=list(self._finished))  # fmt: skip
        self._arrived = 0
        self._finished.clear()
        await self._events.publish(self._subject, report)


class PlanFollower:
    """The planner's last decision, if a planner runs in this namespace."""

    def __init__(self, events: EventPlane, namespace: str) -> None:
        self._events, self._subject = events, planner_subject(namespace)
        self.last: PlannerReport | None = None
        self._task: asyncio.Task[None] | None = None
        self._sub = None

    async def start(self) -> None:
        self._sub = await self._events.subscribe(self._subject, PlannerReport)
        self._task = asyncio.get_running_loop().create_task(self._follow(self._sub))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _follow(self, sub) -> None:
        async for report in sub:
            self.last = report
