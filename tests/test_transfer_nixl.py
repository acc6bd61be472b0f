"""KV transfer through NIXL (UCX on this CPU): prefill and decode `Worker`s on a real TCP
request plane, the decode worker READing the blocks into its own cache through its NIXL
agent. Outputs must equal one aggregated engine's, every failure must end with every block
freed on every side, and workers with no transport in common never pair. Two processes
moving KV through NIXL: tests/test_disagg_serve.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import subprocess
import sys

import msgspec
import pytest
from disagg_support import make_engine, prompt_of, refused_prefill_worker, request, settle, tokens

from tandem.deploy import LocalCluster
from tandem.engine.async_engine import AsyncEngine
from tandem.frontend.disagg import DisaggConfig
from tandem.transfer import nixl
from tandem.transfer.tcp import KvExportServer
from tandem.worker import kv_transport, model_card
from tandem.worker.kv_transport import transport_names

if nixl.nixl_api() is None:
    REASON = "NIXL not installed (pip install -e '.[test]' brings nixl-cu12)"
    if os.environ.get("CI") == "true":
        pytest.fail(REASON, pytrace=False)
    pytest.skip(REASON, allow_module_level=True)


@pytest.fixture(autouse=True)
def no_agent_outlives_its_test():
    """Free each test's agents (held in reference cycles, each with its threads and UCX
    workers) before the next test runs."""
    yield
    gc.collect()


def nixl_cluster(prefill: AsyncEngine, decode: AsyncEngine) -> LocalCluster:
    return LocalCluster([prefill, decode], ["prefill", "decode"], served="tiny", transport="tcp",
                        kv_transport="nixl", publish_interval=0.02, policy="kv",
                        disagg=DisaggConfig(max_local_prefill_length=0))  # fmt: skip


def count_tcp_pulls(monkeypatch) -> list[int]:
    pulls = []
    pull = KvExportServer.pull

    async def counted(self, req):
        pulls.append(len(req.indices))
        async for chunk in pull(self, req):
            yield chunk

    monkeypatch.setattr(KvExportServer, "pull", counted)
    return pulls


@pytest.mark.parametrize("prompt_len", [5, 16, 37, 150])
def test_nixl_transfer_equals_aggregated(pair, aggregated, monkeypatch, prompt_len):
    tcp_pulls = count_tcp_pulls(monkeypatch)

    async def main():
        async with nixl_cluster(*pair()) as c:
            prompt = prompt_of(prompt_len, prompt_len)
            want = await tokens(aggregated.generate(request("a", prompt)))
            assert await tokens(c.remote.generate(request("d", prompt))) == want
            decode = c.engines[1].stats()
            assert decode.kv_imports == 1 and decode.kv_import_fallbacks == 0
            assert c.worker("decode").kv_source.source.nixl_fetches == 1
            assert tcp_pulls == []  # every block came through NIXL
            await settle(*c.engines)  # released by the decode worker, not by the deadline
            assert c.engines[0].stats().kv_exports_expired == 0

    asyncio.run(main())


async def _failing_read(self, peer, src, dst):
    raise nixl.NixlError("NIXL read ended in state ERR")


async def _stuck_read(self, peer, src, dst):
    await asyncio.sleep(3600)


@pytest.mark.parametrize(("read", "timeout"), [(_failing_read, 10.0), (_stuck_read, 0.5)])
def test_a_failed_or_late_read_computes_here_and_frees_both_sides(
    pair, aggregated, monkeypatch, read, timeout
):
    monkeypatch.setattr(nixl.NixlAgent, "read", read)

    async def main():
        async with nixl_cluster(*pair(transfer_timeout=timeout)) as c:
            prompt = prompt_of(5, 90)
            want = await tokens(aggregated.generate(request("a", prompt)))
            assert await tokens(c.remote.generate(request("d", prompt))) == want
            assert c.engines[1].stats().kv_import_fallbacks == 1
            await settle(*c.engines)  # released by the decode worker, not by the deadline
            assert c.engines[0].stats().kv_exports_expired == 0

    asyncio.run(main())


def test_the_prefill_worker_dies_mid_read(pair, aggregated, monkeypatch):
    """The read completes but the prefill worker is gone before it is confirmed: the blocks
    may have been reused, so the decode worker computes the prompt itself; the dead side's
    blocks go at its deadline."""
    read = nixl.NixlAgent.read

    async def dying(self, peer, src, dst):
        await read(self, peer, src, dst)
        await dying.server.stop()  # the process "dies": its request plane drops

    monkeypatch.setattr(nixl.NixlAgent, "read", dying)

    async def main():
        async with nixl_cluster(*pair(prefill_ttl=1.0)) as c:
            dying.server = c.worker("prefill")._server
            prompt = prompt_of(7, 90)
            want = await tokens(aggregated.generate(request("a", prompt)))
            assert await tokens(c.remote.generate(request("d", prompt))) == want
            assert c.engines[1].stats().kv_import_fallbacks == 1
            await settle(*c.engines)
            assert c.engines[0].stats().kv_exports_expired == 1

    asyncio.run(main())


def test_the_client_leaves_mid_read(pair, monkeypatch):
    gate, reading = asyncio.Event(), asyncio.Event()
    read = nixl.NixlAgent.read

    async def held(self, peer, src, dst):
        reading.set()
        await gate.wait()
        await read(self, peer, src, dst)

    monkeypatch.setattr(nixl.NixlAgent, "read", held)

    async def main():
        async with nixl_cluster(*pair()) as c:
            got: list[int] = []

            async def consume():
                async for out in c.remote.generate(request("c", prompt_of(9, 120), 50)):
                    got.extend(out.token_ids)

            consumer = asyncio.create_task(consume())
            async with asyncio.timeout(5):
                await reading.wait()
            assert len(got) == 1 and c.engines[1].stats().active_blocks > 0
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
            await settle(*c.engines)
            stats = c.engines[0].stats()
            assert stats.kv_exports_expired == 0 and stats.active_blocks == 0
            gate.set()

    asyncio.run(main())


def test_a_cancelled_read_ends_before_its_blocks_are_given_back():
    """NIXL may still be writing into the destination blocks when a read is abandoned; the
    handle is released only once the transfer left the PROC state."""
    states = iter(["PROC", "PROC", "DONE"])
    calls = []

    class Agent:
        def check_xfer_state(self, handle):
            calls.append("check")
            return next(states)

        def release_xfer_handle(self, handle):
            calls.append("release")

    agent = nixl.NixlAgent.__new__(nixl.NixlAgent)
    agent.agent = Agent()
    agent._end("handle", "PROC")
    assert calls == ["check", "check", "check", "release"]


def test_a_prefill_worker_with_no_transport_in_common_is_refused_when_it_registers(
    pair, monkeypatch, caplog
):
    """The prefill worker offers NIXL only, the decode worker TCP only: the prefill worker
    never joins, and requests are prefilled where they decode."""
    prefill, decode = pair()
    names = {id(prefill): ["nixl"], id(decode): ["tcp"]}
    monkeypatch.setattr(kv_transport, "transport_names", lambda choice, e: names[id(e)])

    async def main():
        async with nixl_cluster(prefill, decode) as c:
            await refused_prefill_worker(c)

    asyncio.run(main())
    assert "cannot pair with the decode workers: no KV transport in common" in caplog.text


def test_what_each_kv_transport_choice_means_here(tiny_llama):
    engine = make_engine(tiny_llama)
    try:
        assert transport_names("nixl", engine) == ["nixl"]
        assert transport_names("auto", engine) == ["nixl", "tcp"]
        with pytest.raises(ValueError, match="cuda-ipc needs the KV cache on a GPU"):
            transport_names("cuda-ipc", engine)
        card = model_card(engine, "tiny", role="decode")
        assert card.kv_mismatch(msgspec.structs.replace(card, kv_transports=["nixl"])) is not None
        both = msgspec.structs.replace(card, kv_transports=["nixl", "tcp"])
        assert card.kv_mismatch(both) is None
    finally:
        engine.shutdown()


def test_auto_offers_nixl_for_gpu_caches_only_where_an_rdma_device_is(monkeypatch, tmp_path):
    class GpuCache:
        is_cuda = True

    class GpuEngine:  # stands in for an engine whose KV cache is on a GPU
        def kv_caches(self):
            return GpuCache(), GpuCache()

    assert kv_transport.rdma_devices(str(tmp_path / "absent")) == []
    (tmp_path / "mlx5_0").mkdir()
    assert kv_transport.rdma_devices(str(tmp_path)) == ["mlx5_0"]
    monkeypatch.setattr(kv_transport, "rdma_devices", lambda: [])
    assert transport_names("auto", GpuEngine()) == ["cuda-ipc", "tcp"]
    assert transport_names("nixl", GpuEngine()) == ["nixl"]  # named, it is still taken
    monkeypatch.setattr(kv_transport, "rdma_devices", lambda: ["mlx5_0"])
    assert transport_names("auto", GpuEngine()) == ["cuda-ipc", "nixl", "tcp"]


def agents_process(tmp_path, count: int, then: str, tag: str, env=None) -> str:
    """Run `count` NixlAgents over tiny caches in a process of their own, then the `then`
    code, which prints a line starting with `tag`: that line."""
    script = tmp_path / "agents.py"
    script.write_text(
        "import os, time, psutil, torch\n"
        "from tandem.protocol import KvLayout\n"
        "from tandem.transfer.nixl import NixlAgent\n"
        "lay = KvLayout(num_layers=1, block_size=4, num_kv_heads=1, head_dim=8, dtype='float32')\n"
        "agents = [NixlAgent(torch.zeros(1, 4, 4, 1, 8), torch.zeros(1, 4, 4, 1, 8), lay)\n"
        f"          for _ in range({count})]\n" + then
    )
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    lines = [x for x in out.stdout.splitlines() if x.startswith(tag)]
    assert lines, out.stdout + out.stderr
    return lines[0]


def test_the_agent_of_a_loopback_worker_listens_on_loopback_only(tmp_path):
    """UCX listens on every interface unless told otherwise; a worker that serves 127.0.0.1
    only must not expose its KV cache beyond it."""
    env = {k: v for k, v in os.environ.items() if k != "UCX_NET_DEVICES"}
    line = agents_process(tmp_path, 1, (
        "conns = psutil.Process().net_connections('inet')\n"
        "print('LISTEN', sorted({c.laddr.ip for c in conns if c.status == 'LISTEN'}))\n"
    ), "LISTEN", env)  # fmt: skip
    assert line == "LISTEN ['127.0.0.1']"


def test_idle_agents_leave_the_cores_alone(tmp_path):
    """NIXL's own Python API starts a progress thread that polls without pause (a core per
    agent, busy or idle); Tandem's agents sleep between polls."""
    line = agents_process(tmp_path, 2, (
        "time.sleep(0.5)\n"
        "cpu, wall = time.process_time(), time.monotonic()\n"
        "time.sleep(2)\n"
        "print('IDLE', (time.process_time() - cpu) / (time.monotonic() - wall))\n"
    ), "IDLE")  # fmt: skip
    cores_busy = float(line.split()[1])
    assert cores_busy < 0.2, f"two idle agents kept {cores_busy:.2f} cores busy"


def test_reads_land_in_place_and_peers_are_bounded(monkeypatch):
    """Real agents in one process: blocks land where asked, every layer, K and V; block ids
    past a cache are refused (they would address another layer); the prepared peers are
    bounded, least recently read first."""
    import torch

    from tandem.protocol import KvLayout

    monkeypatch.setattr(nixl, "MAX_PEERS", 1)
    layout = KvLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")

    def caches(fill):
        return [torch.full((2, 6, 4, 2, 8), float(fill)) for _ in range(2)]

    mine = caches(0)
    reader = nixl.NixlAgent(*mine, layout)
    peers = [nixl.NixlAgent(*caches(i + 1), layout) for i in range(3)]

    async def main():
        for i, peer in enumerate(peers):
            await reader.read(peer.cache, [5, 0], [i, 3])
            assert all(float(c[:, i].mean()) == i + 1 for c in mine)  # from its block 5
            assert list(reader._peers) == [peer.cache]
        with pytest.raises(ValueError, match="cannot go to"):
            await reader.read(peers[0].cache, [6], [0])  # block 6 of a 6-block cache

    asyncio.run(main())


def test_auto_goes_on_without_nixl_when_it_cannot_register_the_cache(tiny_llama, monkeypatch):
    """`auto` on a host whose NIXL cannot take the cache (say, a UCX without the GPU's
    memory type) logs why and moves KV without it; a named `nixl` fails at start."""
    from tandem.worker.kv_transport import open_kv_transport

    def broken(*args, **kwargs):
        raise nixl.NixlError("VRAM is not supported")

    monkeypatch.setattr("tandem.worker.kv_transport.NixlAgent", broken)
    engine = make_engine(tiny_llama)
    try:
        kv = open_kv_transport(engine, "decode", "auto", client=None)
        assert kv.names == ["tcp"] and kv.nixl is None and kv.source is not None
        with pytest.raises(nixl.NixlError):
            open_kv_transport(engine, "prefill", "nixl", client=None)
    finally:
        engine.shutdown()
