"""What the disaggregation tests share: engines on the tiny model, requests, and waiting for
every block to be freed (the `aggregated` and `pair` fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.protocol import GenerateRequest, SamplingParams

BLOCKS = 96


def make_engine(model, **config) -> AsyncEngine:
    return AsyncEngine(EngineConfig(model=str(model), num_gpu_blocks=BLOCKS, **config))


def request(rid: str, prompt: list[int], max_tokens: int = 10, **sampling) -> GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerateRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling),
    )


def prompt_of(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 380) for _ in range(n)]


async def tokens(outputs: AsyncIterator) -> list[int]:
    return [t async for out in outputs for t in out.token_ids]


async def tokens_into(into: list[int], outputs: AsyncIterator) -> None:
    async for out in outputs:
        into.extend(out.token_ids)


async def refused_prefill_worker(cluster) -> None:
    """The cluster's prefill worker was refused when it registered: none joined, and a
    request is prefilled where it decodes."""
    assert not cluster.remote.prefill.workers
    out = await tokens(cluster.remote.generate(request("m", prompt_of(2, 60), max_tokens=3)))
    assert len(out) == 3
    assert cluster.remote.planner.counts["local_no_prefill_workers"] == 1


async def settle(*engines: AsyncEngine) -> None:
    """Wait until no engine holds a block for a request (cached ones are free)."""
    async with asyncio.timeout(10):
        while any(e.stats().active_blocks for e in engines):
            await asyncio.sleep(0.01)
