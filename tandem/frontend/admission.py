"""Admission control: refuse work quickly instead of queueing it, so admitted work stays fast.

Two bounds, both checked before a body is tokenized and again at admission (each prompt
times `n` counts: what the engine runs):

- `max_waiting`, a hard cap on sequences queued for the engine. The engine publishes its
  waiting count once per step, so a burst between two steps would slip past it; the
  requests this frontend handed over that have not produced a token yet count as well.
- `LatencyLimit`, a limit on sequences in flight that adapts to keep the time to first
  token near its unloaded figure: the capacity of a fleet changes with its workload, so
  none is configured, and past capacity only queues grow.

Refusals are 503 with Retry-After, so a load balancer or client can go elsewhere or back off.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from tandem.http.errors import APIError
from tandem.protocol import LoadStats

RETRY_AFTER_SECONDS = 1


class LatencyLimit:
    """A TCP Vegas-like limit on sequences in flight, driven by time to first token.

    TTFTs are gathered in windows (`window` samples and at least `min_window_s`). The
    baseline is the lowest window p90 of the last `memory_s`: what the TTFT is when nothing
    queues. A window whose p90 is over `shrink_above` times it cuts the limit to nine tenths
    of the most that was in flight (a limit far above the load would take long to come
    down); one under `grow_below` times it that reached the limit raises it by a twentieth
    (and one); in between the limit holds. It stays within [`floor`, `ceiling`]. A workload
    whose TTFT shifts for good (longer prompts) re-bases within `memory_s`.
    """

    def __init__(
        self,
        initial: int = 256,
        *,
        floor: int = 8,
        ceiling: int = 1 << 20,
        grow_below: float = 1.5,
        shrink_above: float = 2.0,
        window: int = 64,
        min_window_s: float = 0.5,
        memory_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = float(min(max(initial, floor), ceiling))
        self.floor, self.ceiling = floor, ceiling
        self.grow_below, self.shrink_above = grow_below, shrink_above
        self.window, self.min_window_s, self.memory_s = window, min_window_s, memory_s
        self._clock = clock
        self._samples: list[float] = []
        self._window_started = clock()
        self._reached = False  # the window saw in-flight sequences at the limit
        self._peak = 0  # the most sequences in flight in the window
        self._p90s: deque[tuple[float, float]] = deque()  # (when, window p90)

    def allows(self, inflight: int, sequences: int) -> bool:
        if inflight + sequences <= self.limit:
            return True
        self._reached = True
        return inflight == 0  # one request larger than the limit still runs, alone

    def note_inflight(self, inflight: int) -> None:
        self._peak = max(self._peak, inflight)
        if inflight >= self.limit:
            self._reached = True

    def observe(self, ttft_s: float) -> None:
        self._samples.append(ttft_s)
        now = self._clock()
        if len(self._samples) < self.window or now - self._window_started < self.min_window_s:
            return
        ranked = sorted(self._samples)
        p90 = ranked[int(0.9 * (len(ranked) - 1))]
        while self._p90s and now - self._p90s[0][0] > self.memory_s:
            self._p90s.popleft()
        self._p90s.append((now, p90))
        baseline = min(v for _, v in self._p90s)
        if p90 > self.shrink_above * baseline:
            self.limit = max(self.floor, min(self.limit, self._peak) * 0.9)
        elif self._reached and p90 < self.grow_below * baseline:
            self.limit = min(self.ceiling, self.limit * 1.05 + 1)
        self._samples.clear()
        self._window_started = now
        self._reached = False
        self._peak = 0


class AdmissionControl:
    def __init__(
        self,
        stats: Callable[[], LoadStats],
        max_waiting: int,
        limit: LatencyLimit | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stats = stats
        self.max_waiting = max_waiting
        self.limit = limit if limit is not None else LatencyLimit()
        self._clock = clock
        self._pending: dict[str, tuple[int, float]] = {}  # no token yet: sequences, since
        self._inflight: dict[str, int] = {}  # request id -> its engine sequences
        self.inflight = 0

    @property
    def waiting(self) -> int:
        """Our best figure for engine sequences queued ahead of a new request."""
        return max(self._stats().num_waiting, sum(n for n, _ in self._pending.values()))

    def check(self, sequences: int = 1) -> None:
        """Raise a 503 if `sequences` more would overflow the queue or the in-flight limit."""
        waiting = self.waiting
        if waiting + sequences > self.max_waiting:
            raise _overloaded(
                f"{waiting} sequences are waiting and this request adds {sequences}"
                f" (limit {self.max_waiting})"
            )
        if not self.limit.allows(self.inflight, sequences):
            raise _overloaded(
                f"{self.inflight} sequences are in flight and this request adds {sequences}"
                f" (the limit that keeps time to first token low is now {self.limit.limit:.0f})"
            )

    def admit(self, request_id: str, sequences: int = 1) -> None:
        """Take in a request of `sequences` engine sequences (prompts times `n`), or raise a
        503 when they would not fit."""
        self.check(sequences)
        self._pending[request_id] = (sequences, self._clock())
        self._inflight[request_id] = sequences
        self.inflight += sequences
        self.limit.note_inflight(self.inflight)

    def started(self, request_id: str) -> None:
        """The request produced its first output: it no longer waits. Idempotent."""
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            self.limit.observe(self._clock() - pending[1])

    def ended(self, request_id: str) -> None:
        """The request is over, served or not. Idempotent."""
        self._pending.pop(request_id, None)
        self.inflight -= self._inflight.pop(request_id, 0)


def _overloaded(why: str) -> APIError:
    return APIError(
        503,
        f"The server is overloaded: {why}. Please retry after {RETRY_AFTER_SECONDS}s.",
        code="overloaded",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


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
