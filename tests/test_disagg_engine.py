"""Disaggregation at the engine level: a prefill engine exports a request's KV, a decode engine
imports it and finishes the request, with the tokens one aggregated engine would produce.
Transfers go through the in-process source and through host/TCP on a real socket."""

from __future__ import annotations

import asyncio
import random

import pytest

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.protocol import GenerateRequest, KvTransferParams, SamplingParams
from tandem.runtime import TcpRequestClient, TcpRequestServer
from tandem.transfer.blocks import KvLayoutMismatch
from tandem.transfer.local import LocalKvSource
from tandem.transfer.tcp import KvExportServer, TcpKvSource

BLOCKS = 64


@pytest.fixture(scope="module")
def engines(tiny_llama):
    made = {
        name: AsyncEngine(EngineConfig(model=str(tiny_llama), num_gpu_blocks=BLOCKS))
        for name in ("aggregated", "prefill", "decode")
    }
    yield made
    for engine in made.values():
        engine.shutdown()


def request(rid: str, prompt: list[int], **sampling) -> GenerateRequest:
    sampling.setdefault("max_tokens", 12)
    return GenerateRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=SamplingParams(ignore_eos=True, **sampling),
    )


def prompt_of(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 380) for _ in range(n)]


async def tokens(stream) -> list[int]:
    return [t async for out in stream for t in out.token_ids]


async def settle(*engines) -> None:
    for _ in range(300):
        if all(e.stats().active_blocks == 0 for e in engines):
            return
        await asyncio.sleep(0.01)
    raise AssertionError([e.stats() for e in engines])


async def disaggregated(prefill, decode, source, req: GenerateRequest, worker_id: str = "p"):
    """The frontend's part: prefill with export, then decode with import."""
    export = msgspec_replace(req, kv_export=True)
    outs = [o async for o in prefill.generate(export)]
    assert len(outs) == 1 and outs[0].kv_transfer is not None, outs
    params: KvTransferParams = outs[0].kv_transfer
    params.worker_id = worker_id
    first = outs[0].token_ids
    rest = await tokens(decode.generate(msgspec_replace(req, kv_import=params), source))
    return first + rest, params


def msgspec_replace(req, **changes):
    import msgspec

    return msgspec.structs.replace(req, **changes)


@pytest.mark.parametrize("prompt_len", [5, 16, 37, 64])
def test_local_transfer_matches_aggregated_greedy(engines, prompt_len):
    prefill, decode, agg = engines["prefill"], engines["decode"], engines["aggregated"]
    source = LocalKvSource(decode.kv_layout)
    source.register("p", prefill)

    async def main():
        prompt = prompt_of(prompt_len, prompt_len)
        want = await tokens(agg.generate(request("a", prompt, temperature=0.0)))
        got, _ = await disaggregated(prefill, decode, source, request("d", prompt, temperature=0))
        assert got == want
        await settle(prefill, decode)
        stats = decode.stats()
        assert stats.kv_imports >= 1 and stats.kv_import_fallbacks == 0

    asyncio.run(main())


def test_seeded_sampling_is_reproducible_across_the_split(engines):
    prefill, decode, agg = engines["prefill"], engines["decode"], engines["aggregated"]
    source = LocalKvSource(decode.kv_layout)
    source.register("p", prefill)

    async def main():
        prompt = prompt_of(7, 40)
        sampling = {"temperature": 1.0, "seed": 1234, "top_p": 0.9}
        want = await tokens(agg.generate(request("a", prompt, **sampling)))
        got, params = await disaggregated(prefill, decode, source, request("d", prompt, **sampling))
        assert params.rng_state is None  # unused: the noise follows from the token count
        assert got == want

    asyncio.run(main())


def test_tcp_transfer_matches_and_frees_both_sides(engines):
    prefill, decode, agg = engines["prefill"], engines["decode"], engines["aggregated"]

    async def main():
        server = TcpRequestServer("127.0.0.1", 0)
        exporter = KvExportServer(prefill)
        exporter.add_endpoints(server)
        await server.start()
        client = TcpRequestClient()
        source = TcpKvSource(client, decode.kv_layout, decode.kv_caches)
        try:
            prompt = prompt_of(3, 150)
            want = await tokens(agg.generate(request("a", prompt, temperature=0.0)))
            req = request("t", prompt, temperature=0.0)
            export = msgspec_replace(req, kv_export=True)
            outs = [o async for o in prefill.generate(export)]
            params = outs[0].kv_transfer
            params.worker_id, params.address = "p", server.address
            assert prefill.stats().active_blocks == len(params.block_ids) == 10
            rest = await tokens(decode.generate(msgspec_replace(req, kv_import=params), source))
            assert outs[0].token_ids + rest == want
            assert exporter.pulled_bytes == prefill.kv_layout.block_bytes * 10
            await settle(prefill, decode)
        finally:
            await client.close()
            await server.stop()

    asyncio.run(main())


def test_layout_mismatch_is_refused_at_registration(tiny_models, engines):
    other = AsyncEngine(EngineConfig(model=str(tiny_models["qwen3"]), num_gpu_blocks=8))
    try:
        source = LocalKvSource(engines["decode"].kv_layout)
        with pytest.raises(KvLayoutMismatch, match="differs"):
            source.register("q", other)
    finally:
        other.shutdown()
