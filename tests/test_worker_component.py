"""Worker + RemoteEngine in one process: memory discovery and events, a real TCP request plane,
the mock engine. Registration with a model card, generate over TCP, cancellation reaching the
engine, load publishing, card mismatch refusal, graceful drain."""

from __future__ import annotations

import asyncio
import time

import pytest

from tandem.deploy import LocalCluster
from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.frontend.remote_engine import NoWorkers, RemoteEngine
from tandem.protocol import GenerateOutput, GenerateRequest, SamplingParams
from tandem.protocol.worker import GENERATE_ENDPOINT, ModelCard, WorkerLoad, load_subject
from tandem.runtime import MemoryDiscovery, MemoryEventPlane, TcpRequestClient, TcpRequestServer
from tandem.worker import Worker, model_card


@pytest.fixture(scope="module")
def engines(tiny_llama):
    made = [
        AsyncEngine(EngineConfig(model=str(tiny_llama), engine="mock", num_gpu_blocks=64))
        for _ in range(2)
    ]
    yield made
    for engine in made:
        engine.shutdown()


def request(rid: str, max_tokens: int = 8) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        prompt_token_ids=list(range(1, 20)),
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0),
    )


def cluster(engines, model: str = "tiny") -> LocalCluster:
    """Workers over the engines (TCP request plane) and a RemoteEngine that sees them."""
    return LocalCluster(engines, served=model, transport="tcp", lease_ttl=1.0,
                        publish_interval=0.02)  # fmt: skip


async def collect(remote, req) -> list[GenerateOutput]:
    return [out async for out in remote.generate(req)]


def test_worker_registers_card_and_serves_generate_over_tcp(engines):
    async def main():
        async with cluster(engines[:1]) as pool:
            (info,) = await pool.discovery.list("tandem.backend.generate")
            card = ModelCard.from_metadata(info.metadata)
            assert card.model == "tiny" and card.role == "aggregated"
            assert card.block_size == engines[0].block_size
            assert card.total_blocks == 64
            assert card.max_model_len == engines[0].max_model_len
            assert ":" in info.address  # host:port of the TCP plane
            # Straight over the request plane, without RemoteEngine.
            outs = [
                o
                async for o in pool.client.call(
                    info.address, GENERATE_ENDPOINT, request("a"), response_type=GenerateOutput
                )
            ]
            assert sum(len(o.token_ids) for o in outs) == 8
            assert outs[-1].finish_reason == "length"
            assert pool.remote.max_model_len == card.max_model_len

    asyncio.run(main())


def test_round_robin_stats_and_invalid_request(engines):
    async def main():
        async with cluster(engines) as pool:
            results = await asyncio.gather(
                *(collect(pool.remote, request(f"r{i}")) for i in range(6))
            )
            assert all(sum(len(o.token_ids) for o in r) == 8 for r in results)
            assert sorted(w["requests"] for w in pool.remote.describe()) == [3, 3]
            # Load arrives from both workers' publishers and is summed.
            deadline = time.monotonic() + 3
            while pool.remote.stats().total_blocks != 128:
                assert time.monotonic() < deadline, pool.remote.stats()
                await asyncio.sleep(0.02)
            with pytest.raises(ValueError):
                await collect(pool.remote, GenerateRequest(request_id="bad", prompt_token_ids=[]))

    asyncio.run(main())


def test_abort_cancels_on_the_worker(engines):
    async def main():
        async with cluster(engines[:1]) as pool:
            stream = pool.remote.generate(request("long", max_tokens=100000))
            first = await anext(stream)
            assert first.request_id == "long"
            sub = await pool.events.subscribe(load_subject("tandem"), WorkerLoad)
            pool.remote.abort("long")
            rest = [o async for o in stream]
            assert all(o.finish_reason is None for o in rest)
            # The engine freed the request: its load drops back to no running sequence.
            async with asyncio.timeout(3):
                async for msg in sub:
                    if msg.stats.num_running == 0:
                        break
            await sub.unsubscribe()

    asyncio.run(main())


def test_one_of_n_sequences_is_cancelled_on_the_worker(engines):
    """A stop string ends one choice of `n`: the frontend cancels that sequence on the
    worker (a cancel message), the others run to their end."""

    async def main():
        async with cluster(engines) as pool:
            sampling = SamplingParams(max_tokens=200, n=3, ignore_eos=True, temperature=0.0)
            req = GenerateRequest(request_id="n3", prompt_token_ids=list(range(1, 20)),
                                  sampling=sampling)  # fmt: skip
            counts, reasons, cancelled = [0, 0, 0], {}, False
            async for out in pool.remote.generate(req):
                counts[out.index] += len(out.token_ids)
                if out.finish_reason:
                    reasons[out.index] = out.finish_reason
                if out.index == 1 and counts[1] >= 3 and not cancelled:
                    pool.remote.abort("n3", 1)
                    cancelled = True
            assert reasons == {0: "length", 1: "abort", 2: "length"}, reasons
            assert counts[0] == counts[2] == 200 and counts[1] < 200, counts

    asyncio.run(main())


def test_mismatched_card_is_refused(engines, caplog):
    async def main():
        async with cluster(engines[:1]) as pool:
            other = Worker(
                engines[1],
                model_card(engines[1], "another-model"),
                discovery=pool.discovery,
                events=pool.events,
                server=TcpRequestServer(),
            )
            await other.start()
            await asyncio.sleep(0.05)
            assert len(pool.remote.describe()) == 1
            await other.drain(0.1)
        assert any(
            "refusing worker" in r.message and "another-model" in r.message for r in caplog.records
        )

    asyncio.run(main())


def test_graceful_drain_finishes_inflight_and_takes_no_new_work(engines):
    async def main():
        async with cluster(engines) as pool:
            a, b = pool.workers
            # Start a long request on each worker (round robin alternates).
            s1 = pool.remote.generate(request("d1", max_tokens=60))
            s2 = pool.remote.generate(request("d2", max_tokens=60))
            firsts = [await anext(s1), await anext(s2)]
            assert a.inflight == 1 and b.inflight == 1
            drain = asyncio.create_task(a.drain(grace=30))
            await asyncio.sleep(0.05)
            assert len(pool.remote.describe()) == 1  # removed from discovery at once
            # New work goes to b only, and every new request succeeds.
            news = await asyncio.gather(
                *(collect(pool.remote, request(f"n{i}", 4)) for i in range(4))
            )
            assert all(sum(len(o.token_ids) for o in r) == 4 for r in news)
            # Both in-flight requests finish in full, the drained one included.
            for first, s in zip(firsts, (s1, s2), strict=True):
                outs = [first] + [o async for o in s]
                assert sum(len(o.token_ids) for o in outs) == 60
                assert outs[-1].finish_reason == "length"
            await asyncio.wait_for(drain, 10)
            assert a.inflight == 0

    asyncio.run(main())


def test_drain_past_its_grace_migrates_what_is_left(engines):
    """A worker drained with too short a grace cancels its streams; they go on on the other
    worker and the caller gets every token once, as from an uninterrupted run."""

    async def main():
        async with cluster(engines) as pool:
            a, b = pool.workers
            want = [t for o in await collect(pool.remote, request("u", 300)) for t in o.token_ids]
            stream = pool.remote.generate(request("u", 300))
            got = list((await anext(stream)).token_ids)
            assert a.inflight + b.inflight == 1
            await (a if a.inflight else b).drain(grace=0.1)
            got += [t async for o in stream for t in o.token_ids]
            assert got == want
            assert pool.remote.migrations == 1

    asyncio.run(main())


def test_no_workers_is_a_clear_error():
    async def main():
        remote = RemoteEngine(MemoryDiscovery(), MemoryEventPlane(), TcpRequestClient())
        await remote.start()
        with pytest.raises(NoWorkers):
            await collect(remote, request("x"))
        assert remote.error == "no live workers"
        await remote.close()

    asyncio.run(main())


@pytest.fixture(scope="module")
def real_engines(tiny_llama):
    made = [AsyncEngine(EngineConfig(model=str(tiny_llama), num_gpu_blocks=64)) for _ in range(2)]
    yield made
    for engine in made:
        engine.shutdown()


def test_a_request_of_n_migrates_sequence_by_sequence(real_engines):
    """n = 3 seeded sequences, their worker drained mid-stream: each unfinished sequence goes
    on as a request of its own (its index and noise stream kept) and the caller gets, per
    index, exactly the tokens of an uninterrupted run."""
    seeded = SamplingParams(max_tokens=300, ignore_eos=True, temperature=0.9, seed=11, n=3)
    req = GenerateRequest(request_id="n3", prompt_token_ids=list(range(1, 20)), sampling=seeded)

    def by_index(outputs) -> dict[int, list[int]]:
        got: dict[int, list[int]] = {}
        for out in outputs:
            assert out.request_id == "n3"
            got.setdefault(out.index, []).extend(out.token_ids)
        return got

    async def main():
        async with cluster(real_engines) as pool:
            a, b = pool.workers
            want = by_index(await collect(pool.remote, req))
            assert len({tuple(v) for v in want.values()}) == 3  # the sequences differ
            stream = pool.remote.generate(req)
            outputs = [await anext(stream) for _ in range(6)]
            await (a if a.inflight else b).drain(grace=0.05)
            split = False
            async for out in stream:
                outputs.append(out)
                split = split or bool(pool.remote.migration.parts("n3"))
            assert split  # one part per unfinished sequence
            got = by_index(outputs)
            assert got == want
            assert all(len(v) == 300 for v in got.values())
            assert sum(o.finish_reason == "length" for o in outputs) == 3
            assert pool.remote.migrations >= 1 and pool.remote.migration.parts("n3") == []

    asyncio.run(main())


def test_one_sequence_of_a_split_request_can_still_be_cancelled(real_engines):
    seeded = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0.9, seed=3, n=2)
    req = GenerateRequest(request_id="c2", prompt_token_ids=list(range(1, 20)), sampling=seeded)

    async def main():
        async with cluster(real_engines) as pool:
            a, b = pool.workers
            stream = pool.remote.generate(req)
            first = await anext(stream)
            await (a if a.inflight else b).drain(grace=0.05)
            tokens = {0: 0, 1: 0}
            tokens[first.index] += len(first.token_ids)
            async for out in stream:  # up to the split (outputs sent before it come first)
                tokens[out.index] += len(out.token_ids)
                if pool.remote.migration.parts("c2"):
                    break
            assert sorted(pool.remote.migration.parts("c2")) == ["c2/seq0", "c2/seq1"]
            pool.remote.abort("c2", 1)
            async for out in stream:
                tokens[out.index] += len(out.token_ids)
            assert tokens[0] == 200 and tokens[1] < 200

    asyncio.run(main())
