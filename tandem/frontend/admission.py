"""Admission control: refuse work quickly instead of queueing without bound.

A request that would wait behind `max_waiting` others gets 503 with Retry-After, so a load
balancer or client can go elsewhere or back off, rather than every queued request's latency
growing without limit. The engine's own waiting count is published once per engine step, so
a burst arriving between two steps would slip past it; we also count the requests this
frontend has handed to the engine that have not produced a token yet.
"""

from __future__ import annotations

from collections.abc import Callable

from tandem.frontend.errors import APIError
from tandem.protocol import LoadStats

RETRY_AFTER_SECONDS = 1


class AdmissionControl:
    def __init__(self, stats: Callable[[], LoadStats], max_waiting: int) -> None:
        self._stats = stats
        self.max_waiting = max_waiting
        self._pending: set[str] = set()

    @property
    def waiting(self) -> int:
        """Our best figure for requests queued ahead of a new one."""
        return max(self._stats().num_waiting, len(self._pending))

    def admit(self, request_id: str) -> None:
        """Take a request in, or raise a 503 when the queue is full."""
        waiting = self.waiting
        if waiting >= self.max_waiting:
            raise APIError(
                503,
                f"The server is overloaded: {waiting} requests are waiting (limit "
                f"{self.max_waiting}). Please retry after {RETRY_AFTER_SECONDS}s.",
                code="overloaded",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        self._pending.add(request_id)

    def started(self, request_id: str) -> None:
        """The request produced output or ended: it no longer waits. Idempotent."""
        self._pending.discard(request_id)
