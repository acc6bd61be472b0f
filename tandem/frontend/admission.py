"""Admission control: refuse work quickly instead of queueing without bound.

A request whose sequences (each prompt times `n`: what the engine queues) would take the
waiting queue past `max_waiting` gets 503 with Retry-After, so a load
balancer or client can go elsewhere or back off, rather than every queued request's latency
growing without limit. The engine's own waiting count is published once per engine step, so
a burst arriving between two steps would slip past it; we also count the requests this
frontend has handed to the engine that have not produced a token yet.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from tandem.frontend.errors import APIError
from tandem.protocol import LoadStats

RETRY_AFTER_SECONDS = 1


class AdmissionControl:
    def __init__(self, stats: Callable[[], LoadStats], max_waiting: int) -> None:
        self._stats = stats
        self.max_waiting = max_waiting
        self._pending: dict[str, int] = {}  # request id -> its engine sequences

    @property
    def waiting(self) -> int:
        """Our best figure for engine sequences queued ahead of a new request."""
        return max(self._stats().num_waiting, sum(self._pending.values()))

    def check(self, sequences: int = 1) -> None:
        """Raise a 503 if `sequences` more would overflow the queue: called before a body
        is tokenized too, so that an overloaded server spends nothing on it."""
        waiting = self.waiting
        if waiting + sequences > self.max_waiting:
            raise APIError(
                503,
                f"The server is overloaded: {waiting} sequences are waiting and this request"
                f" adds {sequences} (limit {self.max_waiting}). Please retry after"
                f" {RETRY_AFTER_SECONDS}s.",
                code="overloaded",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )

    def admit(self, request_id: str, sequences: int = 1) -> None:
        """Take in a request of `sequences` engine sequences (prompts times `n`), or raise a
        503 when they would not fit in the queue."""
        self.check(sequences)
        self._pending[request_id] = sequences

    def started(self, request_id: str) -> None:
        """The request produced output or ended: it no longer waits. Idempotent."""
        self._pending.pop(request_id, None)


class ClientRate:
    """Requests per second per client address (a token bucket each, `rate` tokens a second,
    bursts of up to `max(1, rate)`): over it, 429 with Retry-After. Buckets of the
    `max_clients` most recent clients are kept, so the table has a bound."""

    def __init__(
        self,
        rate: float,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when

    def check(self, client: str) -> None:
        now = self._clock()
        tokens, then = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1.0:
            self._keep(client, tokens, now)
            wait = math.ceil((1.0 - tokens) / self.rate)
            raise APIError(
                429,
                f"Too many requests from this client: the limit is {self.rate:g} per second."
                f" Please retry after {wait}s.",
                code="rate_limited",
                headers={"Retry-After": str(wait)},
            )
        self._keep(client, tokens - 1.0, now)

    def _keep(self, client: str, tokens: float, now: float) -> None:
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
