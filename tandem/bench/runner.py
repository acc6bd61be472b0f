"""When requests are sent: arrival processes and the bounds that end every run.

Three arrival processes:

- `concurrency`: N closed-loop workers, each sending its next request as soon
  as its previous one ends (the classic "N users hammering" load).
- `poisson`: open loop, exponential gaps at `rate` requests/s, independent of
  how fast the server answers (optionally capped at `max_concurrency` in flight;
  a capped request waits and its lag shows as `start_s - scheduled_s`).
- `trace`: open loop at the workload's own `arrival_s` times.

Every run ends by itself: after `num_requests` have been sent and answered, or
at `duration_s`, whichever is first. At the time bound, requests still in
flight are cancelled and recorded with error kind `cancelled`, which the
report counts apart from failures.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tandem.bench.records import ERROR_CANCELLED, ERROR_CLIENT, RequestRecord, RequestSpec
from tandem.bench.workloads import Workload

ARRIVAL_CONCURRENCY = "concurrency"
ARRIVAL_POISSON = "poisson"
ARRIVAL_TRACE = "trace"
ARRIVALS = (ARRIVAL_CONCURRENCY, ARRIVAL_POISSON, ARRIVAL_TRACE)

SendFn = Callable[[RequestSpec, RequestRecord], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Arrival:
    kind: str = ARRIVAL_CONCURRENCY
    concurrency: int = 1
    rate: float = 0.0
    max_concurrency: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ARRIVALS:
            raise ValueError(f"arrival must be one of {ARRIVALS}, got {self.kind!r}")
        if self.kind == ARRIVAL_CONCURRENCY and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.kind == ARRIVAL_POISSON and not self.rate > 0:
            raise ValueError("Poisson arrival needs a request rate > 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max concurrency must be >= 1")

    @property
    def connections(self) -> int:
        """Pool size the client needs so that it never queues requests itself (0 = unbounded)."""
        if self.kind == ARRIVAL_CONCURRENCY:
            return self.concurrency
        return self.max_concurrency or 0


@dataclass(frozen=True, slots=True)
class Bounds:
    duration_s: float
    num_requests: int | None = None

    def __post_init__(self) -> None:
        if not self.duration_s > 0 or not math.isfinite(self.duration_s):
            raise ValueError("duration must be a finite number of seconds > 0")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")


@dataclass(slots=True)
class RunResult:
    records: list[RequestRecord]
    elapsed_s: float
    hit_time_bound: bool = False
    interrupted: bool = False
    started_at: float = field(default_factory=time.time)
    """Wall-clock start (Unix seconds), for the report."""


async def run_load(
    workload: Workload,
    send: SendFn,
    arrival: Arrival,
    bounds: Bounds,
    on_done: Callable[[RequestRecord], None] | None = None,
    stop: asyncio.Event | None = None,
) -> RunResult:
    """Drive `workload` through `send` under `arrival` until `bounds` (or `stop`) end it.

    Record times come back relative to the run start: `scheduled_s` (open loop)
    and `start_s`.
    """
    loop = asyncio.get_running_loop()
    started_at = time.time()
    t0 = time.perf_counter()
    loop_t0 = loop.time()
    limit = bounds.num_requests if bounds.num_requests is not None else math.inf
    records: list[RequestRecord] = []
    inflight: set[asyncio.Task[None]] = set()
    issued = 0

    async def one(spec: RequestSpec, scheduled_s: float | None) -> None:
        rec = RequestRecord(index=len(records), tags=spec.tags, scheduled_s=scheduled_s)
        records.append(rec)
        rec.start_s = time.perf_counter()
        try:
            await send(spec, rec)
        except asyncio.CancelledError:
            rec.error = ERROR_CANCELLED
            raise
        except Exception as e:  # a bench bug must cost one record, not the run
            rec.error, rec.error_detail = ERROR_CLIENT, f"{type(e).__name__}: {e}"[:500]
        finally:
            workload.complete(spec, rec)
            if on_done is not None:
                on_done(rec)

    async def closed_loop_worker() -> None:
        nonlocal issued
        while issued < limit:
            issued += 1
            spec = await workload.next_request()
            if spec is None:
                return
            await one(spec, None)

    async def open_loop() -> None:
        nonlocal issued
        sem = asyncio.Semaphore(arrival.max_concurrency) if arrival.max_concurrency else None
        rng = random.Random(arrival.seed)
        next_t = loop_t0
        while issued < limit:
            if arrival.kind == ARRIVAL_POISSON:
                await asyncio.sleep(max(0.0, next_t - loop.time()))
                spec = await workload.next_request()
            else:
                spec = await workload.next_request()
                if spec is not None:
                    if spec.arrival_s is None:
                        raise ValueError("trace arrival needs a workload with arrival times")
                    next_t = loop_t0 + spec.arrival_s
                    await asyncio.sleep(max(0.0, next_t - loop.time()))
            if spec is None:
                return
            if sem is not None:
                await sem.acquire()
            issued += 1
            task = loop.create_task(one(spec, next_t - loop_t0))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            if sem is not None:
                task.add_done_callback(lambda _t: sem.release())
            if arrival.kind == ARRIVAL_POISSON:
                next_t += rng.expovariate(arrival.rate)

    async def drive() -> None:
        if arrival.kind == ARRIVAL_CONCURRENCY:
            await asyncio.gather(*(closed_loop_worker() for _ in range(arrival.concurrency)))
        else:
            await open_loop()
            while inflight:
                await asyncio.wait(set(inflight))

    driver = loop.create_task(drive())
    waiters: set[asyncio.Future] = {driver}
    stopper = loop.create_task(stop.wait()) if stop is not None else None
    if stopper is not None:
        waiters.add(stopper)
    done, _ = await asyncio.wait(
        waiters, timeout=bounds.duration_s, return_when=asyncio.FIRST_COMPLETED
    )
    elapsed = time.perf_counter() - t0
    hit_time_bound = not done
    interrupted = stopper is not None and stopper in done
    pending = [t for t in (driver, stopper, *inflight) if t is not None and not t.done()]
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if driver.done() and not driver.cancelled() and driver.exception() is not None:
        raise driver.exception()  # type: ignore[misc]
    for rec in records:
        rec.start_s -= t0
    return RunResult(records, elapsed, hit_time_bound, interrupted, started_at)
