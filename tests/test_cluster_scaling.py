"""A mock fleet scaled up and down under load (what the planner's local connector does):
no request fails or loses a token, and the added workers take work."""

from __future__ import annotations

import asyncio

import pytest

from tandem.deploy import LocalCluster
from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.protocol import GenerateRequest, SamplingParams

TOKENS = 200


def mock(model) -> AsyncEngine:
    return AsyncEngine(EngineConfig(model=str(model), engine="mock", num_gpu_blocks=256,
                                    mock_speedup=10.0))  # fmt: skip


@pytest.mark.parametrize("transport", ["local", "tcp"])
def test_workers_join_and_leave_under_load_and_no_request_fails(tiny_llama, transport):
    engines = [mock(tiny_llama)]

    async def one(remote, i: int) -> int:
        request = GenerateRequest(
            request_id=f"r{i}", prompt_token_ids=[1 + i % 50] * 40,
            sampling=SamplingParams(max_tokens=TOKENS, ignore_eos=True),
        )  # fmt: skip
        return sum([len(o.token_ids) async for o in remote.generate(request)])

    async def load(remote, n: int, concurrency: int) -> list[int]:
        gate = asyncio.Semaphore(concurrency)

        async def gated(i: int) -> int:
            async with gate:
                return await one(remote, i)

        return await asyncio.gather(*(gated(i) for i in range(n)))

    async def main():
        cluster = LocalCluster(engines, served="tiny", transport=transport, lease_ttl=2.0,
                               publish_interval=0.02)  # fmt: skip
        async with cluster:
            running = asyncio.create_task(load(cluster.remote, 60, 6))
            await asyncio.sleep(0.2)
            added = [await cluster.add_worker(mock(tiny_llama)) for _ in range(2)]
            engines.extend(w.engine for w in added)
            await asyncio.sleep(0.3)
            routed = {d["instance_id"]: d["requests"] for d in cluster.remote.describe()}
            served = {w.instance_id: routed[w.instance_id] for w in added}
            first = cluster.workers[0]
            moving = first.inflight
            # Scale down past its grace: what is still running on it moves to the others.
            await cluster.remove_worker(first, grace=0.05)
            assert cluster.remote.migrations >= min(moving, 1)
            await cluster.remove_worker(added[0], grace=5.0)
            counts = await asyncio.wait_for(running, 60)
            assert len(cluster.workers) == 1
        return counts, served

    try:
        counts, served = asyncio.run(main())
    finally:
        for engine in engines:
            engine.shutdown()
    assert counts == [TOKENS] * 60
    assert all(n > 0 for n in served.values()), served
