"""Arrival processes and run bounds, with a fake `send` (no network)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tandem.bench.engine_client import engine_sender
from tandem.bench.records import ERROR_STREAM, RequestRecord, RequestSpec
from tandem.bench.runner import Arrival, Bounds, RunResult, run_load
from tandem.bench.tokens import TokenSpace
from tandem.bench.workloads import LengthDist, SyntheticWorkload, Workload
from tandem.protocol import GenerateOutput, GenerateRequest


def workload() -> SyntheticWorkload:
    return SyntheticWorkload(LengthDist.fixed(4), LengthDist.fixed(2), TokenSpace.for_vocab(500))


class FakeSender:
    """Answers after `latency_s`, tracking how many requests are in flight."""

    def __init__(self, latency_s: float, fail_on: int | None = None) -> None:
        self.latency_s, self.fail_on = latency_s, fail_on
        self.inflight = self.max_inflight = self.calls = 0

    async def __call__(self, spec: RequestSpec, rec: RequestRecord) -> None:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("bench bug")
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            rec.ttft_s = 0.0
            await asyncio.sleep(self.latency_s)
            rec.e2e_s, rec.output_tokens = self.latency_s, spec.max_tokens
        finally:
            self.inflight -= 1


def run(
    wl: Workload, send: FakeSender, arrival: Arrival, bounds: Bounds, **kw: object
) -> RunResult:
    return asyncio.run(run_load(wl, send, arrival, bounds, **kw))  # type: ignore[arg-type]


def test_poisson_arrival_bounded_by_count() -> None:
    send = FakeSender(0.01)
    result = run(workload(), send, Arrival("poisson", rate=400.0, seed=5), Bounds(10.0, 40))
    assert len(result.records) == 40 and not result.hit_time_bound
    assert all(r.ok for r in result.records)
    scheduled = [r.scheduled_s for r in result.records]
    rng = random.Random(5)
    expected, t = [], 0.0
    for _ in range(40):  # first request at 0, then exponential gaps from the seeded stream
        expected.append(t)
        t += rng.expovariate(400.0)
    assert scheduled == pytest.approx(expected)
    # Lower bounds are exact (the sender sleeps); upper ones only say nothing stalled.
    assert max(r.start_s - r.scheduled_s for r in result.records) < 0.5
    assert expected[-1] + 0.01 <= result.elapsed_s < expected[-1] + 1.0


def test_poisson_arrival_bounded_by_time_cancels_in_flight() -> None:
    send = FakeSender(5.0)  # nothing finishes before the bound
    t = time.perf_counter()
    result = run(workload(), send, Arrival("poisson", rate=100.0, seed=2), Bounds(0.3, None))
    assert time.perf_counter() - t < 3.0  # the bound, not the 5 s sends
    assert result.hit_time_bound and 0.3 <= result.elapsed_s < 1.5
    rng, t_next, n = random.Random(2), 0.0, 0
    while t_next < 0.3:
        n += 1
        t_next += rng.expovariate(100.0)
    assert abs(len(result.records) - n) <= 1  # the one right at the edge may go either way
    assert all(r.error == "cancelled" for r in result.records)


def test_poisson_respects_max_concurrency() -> None:
    send = FakeSender(0.05)
    result = run(
        workload(), send, Arrival("poisson", rate=1000.0, max_concurrency=3), Bounds(10.0, 12)
    )
    assert len(result.records) == 12 and send.max_inflight == 3
    assert max(r.start_s - r.scheduled_s for r in result.records) > 0.1  # capped ones waited


def test_concurrency_keeps_n_in_flight_and_stops_at_count() -> None:
    send = FakeSender(0.02)
    result = run(workload(), send, Arrival("concurrency", 4), Bounds(10.0, 10))
    assert len(result.records) == 10 and send.max_inflight == 4
    assert [r.index for r in result.records] == list(range(10))
    assert 0.055 <= result.elapsed_s < 1.0  # 3 waves of 20 ms


class TimedWorkload(Workload):
    def __init__(self, arrivals: list[float]) -> None:
        self.arrivals = list(arrivals)

    async def next_request(self) -> RequestSpec | None:
        if not self.arrivals:
            return None
        return RequestSpec([("user", [1])], 1, 1, arrival_s=self.arrivals.pop(0))


def test_trace_arrival_follows_timestamps() -> None:
    result = run(
        TimedWorkload([0.0, 0.05, 0.05, 0.12]),
        FakeSender(0.01),
        Arrival("trace"),
        Bounds(10.0, None),
    )
    starts = [r.start_s for r in result.records]
    assert [r.scheduled_s for r in result.records] == pytest.approx([0.0, 0.05, 0.05, 0.12])
    assert starts == pytest.approx([0.0, 0.05, 0.05, 0.12], abs=0.015)


def test_stop_event_interrupts_and_a_client_bug_costs_one_record() -> None:
    async def go() -> RunResult:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.1, stop.set)
        return await run_load(
            workload(),
            FakeSender(0.03, fail_on=2),
            Arrival("concurrency", 2),
            Bounds(10.0, None),
            stop=stop,
        )

    result = asyncio.run(go())
    assert result.interrupted and not result.hit_time_bound
    assert result.records[1].error == "client" and "bench bug" in result.records[1].error_detail
    assert sum(r.ok for r in result.records) >= 4
    assert 0 < sum(r.error == "cancelled" for r in result.records) <= 2


def test_bounds_and_arrival_validate() -> None:
    with pytest.raises(ValueError):
        Bounds(0)
    with pytest.raises(ValueError):
        Bounds(float("inf"))
    with pytest.raises(ValueError):
        Arrival("poisson", rate=0)
    with pytest.raises(ValueError):
        Arrival("bursty")


def test_engine_sender_records_an_in_process_stream() -> None:
    """`engine_sender` sends the spec's token ids and times every output that carries tokens."""
    seen: list[GenerateRequest] = []

    async def generate(request: GenerateRequest):
        seen.append(request)
        yield GenerateOutput(request_id=request.request_id, token_ids=[7], num_cached_tokens=2)
        for token in (8, 9):
            await asyncio.sleep(0.01)
            yield GenerateOutput(request_id=request.request_id, token_ids=[token])
        if request.sampling.max_tokens == 4:
            raise ConnectionError("worker lost")
        yield GenerateOutput(request_id=request.request_id, finish_reason="length")

    wl = SyntheticWorkload(LengthDist.fixed(5), LengthDist.fixed(3), TokenSpace.for_vocab(500))
    result = run(wl, engine_sender(generate), Arrival("concurrency", 1), Bounds(10.0, 1))
    [rec] = result.records
    [request] = seen
    assert len(request.prompt_token_ids) == 5
    assert request.sampling.max_tokens == 3 and request.sampling.ignore_eos
    assert (rec.input_tokens, rec.output_tokens, rec.cached_tokens) == (5, 3, 2)
    assert rec.output_token_ids == [7, 8, 9] and rec.finish_reason == "length"
    assert rec.error is None and len(rec.itl_s) == 2 and min(rec.itl_s) >= 0.009
    assert rec.e2e_s >= rec.ttft_s + sum(rec.itl_s) - 1e-6

    failing = SyntheticWorkload(LengthDist.fixed(5), LengthDist.fixed(4), TokenSpace.for_vocab(500))
    result = run(failing, engine_sender(generate), Arrival("concurrency", 1), Bounds(10.0, 1))
    [rec] = result.records
    assert rec.error == ERROR_STREAM and "worker lost" in rec.error_detail
    assert rec.output_tokens == 3
