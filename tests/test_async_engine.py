"""The async API: streaming, aborts that free blocks, bad requests, KV events and stats."""

from __future__ import annotations

import asyncio

import pytest

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.protocol import GenerateRequest, KvStored, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = AsyncEngine(EngineConfig(model=str(tiny_llama), num_gpu_blocks=64, max_model_len=256))
    yield eng
    eng.shutdown()


def request(rid, prompt_len=40, max_tokens=200, first=3, **kw):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)
    prompt = list(range(first, first + prompt_len))
    return GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=params)


async def settle(engine, active=0):
    for _ in range(200):
        stats = engine.stats()
        if stats.active_blocks == active and stats.num_running == 0:
            return stats
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine did not settle: {engine.stats()}")


def test_stream_counts_and_finish(engine):
    async def main():
        outs = [o async for o in engine.generate(request("s1", max_tokens=5))]
        assert sum(len(o.token_ids) for o in outs) == 5
        assert outs[-1].finish_reason == "length" and outs[0].num_prompt_tokens == 40
        await settle(engine)

    asyncio.run(main())


def test_abort_frees_blocks(engine):
    async def main():
        got = []

        async def consume():
            async for o in engine.generate(request("a1")):
                got.append(o)

        task = asyncio.create_task(consume())
        while not got:
            await asyncio.sleep(0.01)
        assert engine.stats().active_blocks > 0
        engine.abort("a1")
        await task
        assert got[-1].finish_reason == "abort"
        await settle(engine)

    asyncio.run(main())


def test_consumer_leaving_early_aborts(engine):
    async def main():
        stream = engine.generate(request("b1"))
        async for _ in stream:
            break
        await stream.aclose()
        await settle(engine)

        # A cancelled consumer (a client gone) frees its blocks too.
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate(request("b2")):
                started.set()
                await asyncio.sleep(10)

        task = asyncio.create_task(consume())
        await started.wait()
        assert engine.stats().active_blocks > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await settle(engine)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (request("v1", prompt_len=256), "max_model_len"),
        (request("v2", prompt_len=0), "empty"),
        (request("v3", temperature=-1.0), "temperature"),
        (request("v4", top_p=0.0), "top_p"),
        (request("v5", logprobs=50), "logprobs"),
        (GenerateRequest(request_id="v6", prompt_token_ids=[10**6]), "token ids"),
    ],
)
def test_bad_requests_raise_before_streaming(engine, req, message):
    async def main():
        with pytest.raises(ValueError, match=message):
            async for _ in engine.generate(req):
                pass

    asyncio.run(main())


def test_kv_events_and_prefix_hits(engine):
    async def main():
        engine.take_kv_events()
        [o async for o in engine.generate(request("k1", prompt_len=48, max_tokens=2, first=100))]
        events = engine.take_kv_events()
        stored = [b for e in events if isinstance(e, KvStored) for b in e.blocks]
        assert len(stored) >= 3  # 48 prompt tokens fill three 16-token blocks
        hits_before = engine.stats().prefix_cache_hits
        outs = [
            o async for o in engine.generate(request("k2", prompt_len=48, max_tokens=2, first=100))
        ]
        assert outs[-1].num_cached_tokens == 32
        assert engine.stats().prefix_cache_hits - hits_before == 32

    asyncio.run(main())


def test_abort_one_of_n_sequences(engine):
    async def main():
        finishes = {}
        tokens = {0: 0, 1: 0}
        aborted = False
        async for o in engine.generate(request("n2", max_tokens=40, n=2, seed=1)):
            tokens[o.index] += len(o.token_ids)
            if o.index == 0 and not aborted:  # its first output (one token, or a few queued)
                engine.abort("n2", 0)
                aborted = True
            if o.finish_reason:
                finishes[o.index] = o.finish_reason
        assert finishes == {0: "abort", 1: "length"}
        assert tokens[1] == 40 and tokens[0] < 40
        await settle(engine)

    asyncio.run(main())


def test_a_consumer_that_fell_behind_gets_queued_tokens_as_one_output(engine):
    """Same tokens as a prompt consumer's, in fewer outputs; each of n=2 sequences apart."""

    async def main():
        prompt = dict(max_tokens=12, n=2, seed=5, temperature=1.0)
        fast = [o async for o in engine.generate(request("c1", **prompt))]
        slow = []
        async for o in engine.generate(request("c2", **prompt)):
            slow.append(o)
            if len(slow) == 1:
                await asyncio.sleep(0.5)  # the engine finishes both sequences meanwhile

        def by_index(outs):
            return {i: [t for o in outs if o.index == i for t in o.token_ids] for i in (0, 1)}

        assert by_index(slow) == by_index(fast)
        assert all(len(tokens) == 12 for tokens in by_index(slow).values())
        assert len(slow) <= 4 < len(fast)
        assert sorted(o.index for o in slow if o.finish_reason == "length") == [0, 1]
        await settle(engine)

    asyncio.run(main())
