"""Disaggregated serving through the frontend's `RemoteEngine`: prefill and decode `Worker`s
on a real TCP request plane, KV moved by the host/TCP transport. Outputs must equal one
aggregated engine's, and every failure must end with every block freed on every side."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import pytest
from disagg_support import (
    make_engine,
    prompt_of,
    refused_prefill_worker,
    request,
    settle,
    tokens,
    tokens_into,
)

import tandem.transfer.tcp as tcp_transfer
from tandem.deploy import LocalCluster
from tandem.engine.async_engine import AsyncEngine
from tandem.frontend.disagg import DisaggConfig
from tandem.frontend.remote_engine import WorkerLost
from tandem.transfer.tcp import KvExportServer


def disagg_cluster(prefill: AsyncEngine, decode: AsyncEngine) -> LocalCluster:
    """One prefill and one decode worker on the TCP request plane (KV pulled over it); every
    request is prefilled remotely."""
    return LocalCluster([prefill, decode], ["prefill", "decode"], served="tiny", transport="tcp",
                        publish_interval=0.02, policy="kv",
                        disagg=DisaggConfig(max_local_prefill_length=0))  # fmt: skip


def hold_pulls(monkeypatch) -> tuple[asyncio.Event, asyncio.Event]:
    """Make KV pulls wait for the first event (set by the test); the second is set once a
    pull has started."""
    gate, pulling = asyncio.Event(), asyncio.Event()
    pull = KvExportServer.pull

    async def held_pull(self, req):
        pulling.set()
        await gate.wait()
        async for chunk in pull(self, req):
            yield chunk

    monkeypatch.setattr(KvExportServer, "pull", held_pull)
    return gate, pulling


def test_disaggregated_equals_aggregated(pair, aggregated):
    async def main():
        async with disagg_cluster(*pair()) as c:
            for i, n in enumerate([17, 48, 100, 161]):
                prompt = prompt_of(i, n)
                want = await tokens(aggregated.generate(request(f"a{i}", prompt)))
                got = await tokens(c.remote.generate(request(f"d{i}", prompt)))
                assert got == want, n
            seeded = {"temperature": 0.8, "seed": 7, "top_k": 50}
            prompt = prompt_of(99, 70)
            want = await tokens(aggregated.generate(request("as", prompt, **seeded)))
            got = await tokens(c.remote.generate(request("ds", prompt, **seeded)))
            assert got == want
            assert c.remote.planner.counts["remote"] == 5
            stats = c.engines[1].stats()
            assert stats.kv_imports == 5 and stats.kv_import_fallbacks == 0
            await settle(c.engines[0], c.engines[1])
            assert c.engines[0].stats().kv_exports_expired == 0

    asyncio.run(main())


def test_first_token_streams_before_the_decode_worker_starts(pair, monkeypatch):
    """The first token reaches the caller while the KV pull is still held up."""
    gate, _ = hold_pulls(monkeypatch)

    async def main():
        async with disagg_cluster(*pair()) as c:
            stream = c.remote.generate(request("f", prompt_of(1, 64), max_tokens=5))
            first = await anext(stream)
            assert len(first.token_ids) == 1 and first.kv_transfer is None
            gate.set()
            rest = [t async for out in stream for t in out.token_ids]
            assert len(rest) == 4

    asyncio.run(main())


def test_prefill_worker_dies_mid_transfer(pair, aggregated, monkeypatch):
    """The pull breaks after one chunk: the decode worker computes the prompt itself, with the
    same tokens; its fallback is counted; the dead side's blocks go at its deadline."""
    monkeypatch.setattr(tcp_transfer, "CHUNK_BYTES", 1)  # one layer-block per chunk
    pull = KvExportServer.pull

    async def dying_pull(self, req):
        async for chunk in pull(self, req):
            yield chunk
            await self.server_to_kill.stop()  # the process "dies": connections drop
            await asyncio.sleep(3600)

    monkeypatch.setattr(KvExportServer, "pull", dying_pull)

    async def main():
        async with disagg_cluster(*pair(prefill_ttl=1.0)) as c:
            KvExportServer.server_to_kill = c.worker("prefill")._server
            prompt = prompt_of(5, 90)
            want = await tokens(aggregated.generate(request("a", prompt)))
            got = await tokens(c.remote.generate(request("d", prompt)))
            assert got == want
            assert c.engines[1].stats().kv_import_fallbacks == 1
            await settle(c.engines[0], c.engines[1])
            assert c.engines[0].stats().kv_exports_expired == 1

    asyncio.run(main())


def test_transfer_timeout_falls_back_and_releases(pair, aggregated, monkeypatch):
    async def stuck_pull(self, req):
        await asyncio.sleep(3600)
        yield  # pragma: no cover

    monkeypatch.setattr(KvExportServer, "pull", stuck_pull)

    async def main():
        async with disagg_cluster(*pair(transfer_timeout=0.5)) as c:
            prompt = prompt_of(6, 80)
            want = await tokens(aggregated.generate(request("a", prompt)))
            got = await tokens(c.remote.generate(request("d", prompt)))
            assert got == want
            assert c.engines[1].stats().kv_import_fallbacks == 1
            # Released by the decode worker, not by the (30 s) deadline.
            await settle(c.engines[0], c.engines[1])
            assert c.engines[0].stats().kv_exports_expired == 0

    asyncio.run(main())


def test_decode_worker_dies_after_import(pair, monkeypatch):
    async def main():
        async with disagg_cluster(*pair()) as c:
            stream = c.remote.generate(request("d", prompt_of(8, 100), max_tokens=200))
            assert len((await anext(stream)).token_ids) == 1  # from the prefill worker
            await anext(stream)  # from the decode worker: the import is done
            await c.worker("decode")._server.stop()  # the decode worker "dies"
            with pytest.raises(WorkerLost):
                async for _ in stream:
                    pass
            # The prefill worker's copy was released after the import, not at its deadline.
            await settle(c.engines[0], c.engines[1])
            assert c.engines[0].stats().kv_exports_expired == 0

    asyncio.run(main())


def test_client_disconnects_mid_transfer(pair, monkeypatch):
    gate, pulling = hold_pulls(monkeypatch)

    async def main():
        async with disagg_cluster(*pair()) as c:
            got: list = []
            consumer = asyncio.create_task(
                tokens_into(got, c.remote.generate(request("c", prompt_of(9, 120), max_tokens=50)))
            )
            async with asyncio.timeout(5):
                await pulling.wait()
            assert len(got) == 1  # the first token went out
            assert c.engines[1].stats().active_blocks > 0  # reserved for the import
            consumer.cancel()  # the client went away
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
            await settle(c.engines[0], c.engines[1])
            stats = c.engines[0].stats()
            assert stats.kv_exports_expired == 0 and stats.active_blocks == 0
            gate.set()

    asyncio.run(main())


def test_layout_mismatch_refused_when_the_worker_registers(tiny_models, tiny_llama, caplog):
    """A prefill worker whose KV geometry differs never joins; requests prefill locally."""
    prefill = make_engine(tiny_models["qwen3"])
    decode = make_engine(tiny_llama)

    async def main():
        async with disagg_cluster(prefill, decode) as c:
            await refused_prefill_worker(c)

    try:
        asyncio.run(main())
    finally:
        prefill.shutdown()
        decode.shutdown()
    assert "cannot pair with the decode workers: KV cache" in caplog.text


def test_short_uncached_prompts_prefill_locally(pair):
    async def main():
        async with disagg_cluster(*pair()) as c:
            c.remote.planner.config.max_local_prefill_length = 32
            prompt = prompt_of(4, 200)
            await tokens(c.remote.generate(request("long", prompt, max_tokens=2)))
            async with asyncio.timeout(5):  # the decode worker's KV events reach the router
                while c.remote.pool.router.index.num_blocks() < 12:
                    await asyncio.sleep(0.01)
            follow_up = prompt + prompt_of(5, 20)
            await tokens(c.remote.generate(request("turn2", follow_up, max_tokens=2)))
            assert c.remote.planner.counts == {"remote": 1, "local_short": 1}

    asyncio.run(main())


def test_the_decode_worker_refuses_exports_and_the_prefill_worker_imports(pair):
    async def main():
        async with disagg_cluster(*pair()) as c:
            req = request("x", prompt_of(3, 20))
            with pytest.raises(Exception, match="exports no KV"):
                export = msgspec.structs.replace(req, kv_export=True)
                await tokens(c.remote.stream_from(c.remote.pool, export))

    asyncio.run(main())


def test_a_forged_kv_import_is_refused_and_computed_here(pair, aggregated):
    """A kv_import naming a registered prefill worker at another address: the decode worker
    neither pulls from nor releases at that address, and computes the prompt itself."""
    from tandem.protocol import GenerateOutput, KvTransferParams
    from tandem.protocol.worker import GENERATE_ENDPOINT

    async def main():
        connections = []
        bait = await asyncio.start_server(lambda r, w: connections.append(w), "127.0.0.1", 0)
        port = bait.sockets[0].getsockname()[1]
        async with disagg_cluster(*pair()) as c:
            prompt = prompt_of(5, 40)
            want = await tokens(aggregated.generate(request("a", prompt)))
            forged = KvTransferParams(
                request_id="f", block_ids=[0, 1, 2], num_tokens=len(prompt), token_ids=want[:1],
                layout=c.engines[1].kv_layout, worker_id=c.worker("prefill").instance_id,
                address=f"127.0.0.1:{port}",
            )  # fmt: skip
            req = msgspec.structs.replace(request("f", prompt), kv_import=forged)
            stream = c.client.call(c.worker("decode").info.address, GENERATE_ENDPOINT, req,
                                   response_type=GenerateOutput, timeout=10)  # fmt: skip
            async with stream:
                got = [t async for out in stream for t in out.token_ids]
            assert want[:1] + got == want
            assert c.worker("decode").kv_source.refused == 1
            assert c.engines[1].stats().kv_import_fallbacks == 1
            await asyncio.sleep(0.1)  # a release would have been sent by now
            assert connections == []
        bait.close()

    asyncio.run(main())
