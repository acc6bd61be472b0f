"""The planner loop on a real mock fleet: workers' steps train the pools' step models over
the event plane, the frontend's request reports make the observation, and the in-process
connector grows and shrinks the pools with no request lost."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

import pytest

from tandem.deploy import LocalCluster
from tandem.deploy.scaling import ClusterScaler
from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.frontend.disagg import DisaggConfig
from tandem.planner import PoolBounds, StepModel
from tandem.planner.loop import PlannerLoop, observation
from tandem.planner.plan import Planner, PlannerConfig
from tandem.protocol import GenerateRequest, SamplingParams
from tandem.protocol.observations import RequestSample

TOKENS = 40


def test_an_observation_takes_uncached_prompts_and_the_p90s():
    finished = [RequestSample(100, 40, 10, 0.1 * i, 0.01 * i) for i in range(1, 11)]
    finished.append(RequestSample(50, 0, 0, None, None))  # failed before its first token
    seen = observation(2.0, 12, finished, 1, 2)
    assert seen.requests == 12 and seen.seconds == 2.0
    assert seen.prompt_tokens == [60] * 10 + [50] and seen.output_tokens == [10] * 10 + [0]
    assert seen.ttft_p90_s == pytest.approx(0.91) and seen.itl_p90_s == pytest.approx(0.091)
    assert (seen.prefill_replicas, seen.decode_replicas) == (1, 2)
    empty = observation(1.0, 0, [], 1, 1)
    assert empty.ttft_p90_s is None and empty.prompt_tokens == []


def mock(model) -> AsyncEngine:
    return AsyncEngine(EngineConfig(model=str(model), engine="mock", num_gpu_blocks=512,
                                    mock_speedup=10.0))  # fmt: skip


def test_the_loop_learns_from_the_fleet_and_scales_it_both_ways(tiny_llama):
    engines = [mock(tiny_llama), mock(tiny_llama)]
    made: list[AsyncEngine] = []

    def make(role):
        made.append(mock(tiny_llama))
        return made[-1]

    async def one(remote, i: int) -> int:
        request = GenerateRequest(
            request_id=f"r{i}", prompt_token_ids=[1 + i % 50] * (40 + 16 * (i % 5)),
            sampling=SamplingParams(max_tokens=TOKENS, ignore_eos=True),
        )  # fmt: skip
        return sum([len(o.token_ids) async for o in remote.generate(request)])

    async def main():
        cluster = LocalCluster(
            engines, ["prefill", "decode"], served="tiny", publish_interval=0.02,
            disagg=DisaggConfig(max_local_prefill_length=0, max_prefill_queue_tokens=1 << 40),
            report_interval=0.02,
        )  # fmt: skip
        # Targets no single worker can meet at this load: the planner must grow both pools.
        config = PlannerConfig(ttft_s=1e-4, itl_s=1e-4, prefill=PoolBounds(1, 2),
                               decode=PoolBounds(1, 2), gpu_budget=4, shrink_after=1)  # fmt: skip
        prefill_model, decode_model = StepModel(), StepModel()
        planner = Planner(config, prefill_model, decode_model)
        async with cluster:
            scaler = ClusterScaler(cluster, make, startup_s=0.05, grace=5.0)
            loop = PlannerLoop(planner, cluster.events, scaler, namespace=cluster.remote.namespace,
                               interval=3600)  # fmt: skip
            await loop.start()
            try:
                first = []  # waves of 5, 10 and 15: steps of three sizes in each pool
                for lo, hi in ((0, 5), (5, 15), (15, 30)):
                    first += await asyncio.gather(*(one(cluster.remote, i) for i in range(lo, hi)))
                await asyncio.sleep(0.2)  # the last reports
                up = await loop.tick()
                await asyncio.sleep(0.5)  # the new workers start
                grown = scaler.replicas(), sorted(cluster.roles)
                second = await asyncio.gather(*(one(cluster.remote, i) for i in range(30, 50)))
                await asyncio.sleep(0.2)
                # Targets any pool meets and the traffic gone: one worker a pool goes per
                # interval, to the bounds (within a few intervals: the forecast of the rate
                # keeps a margin for its recent errors).
                planner.config = dataclasses.replace(config, ttft_s=100.0, itl_s=100.0)
                quiet = []
                while len(quiet) < 8 and scaler.replicas() != (1, 1):
                    await asyncio.sleep(0.05)
                    quiet.append(await loop.tick())
                await scaler.close()
                shrunk = scaler.replicas(), list(cluster.roles)
            finally:
                await loop.stop()
        return first + second, up, grown, quiet, shrunk, loop, scaler

    try:
        counts, up, grown, quiet, shrunk, loop, scaler = asyncio.run(main())
    finally:
        for engine in engines + made:
            engine.shutdown()
    assert counts == [TOKENS] * 50, "a request lost tokens while the pools changed"
    seen = loop.history[0].seen
    assert seen.requests == 30 and len(seen.output_tokens) == 30 and seen.ttft_p90_s > 0
    # Each pool's model learned from its own workers' steps (an untrained one holds the pools).
    assert up.prefill_replicas == 2 and up.decode_replicas == 2, up.reasons
    assert loop.planner.model.prefill_s(100) is not None
    assert loop.planner.decode_model.decode_s(4, 400) is not None
    assert grown == ((2, 2), ["decode", "decode", "prefill", "prefill"])
    sizes = [(2, 2)] + [(d.prefill_replicas, d.decode_replicas) for d in quiet]
    why = [(d.forecast_rate, d.reasons) for d in quiet]
    assert sizes[-1] == (1, 1), why
    grew = [(a, b) for a, b in itertools.pairwise(sizes) if b[0] > a[0] or b[1] > a[1]]
    assert not grew, (sizes, why)
    assert shrunk == ((1, 1), ["prefill", "decode"])
    assert scaler.worker_seconds() > 0
