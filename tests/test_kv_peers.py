"""A decode worker pulls KV only from prefill workers that discovery vouches for: the named
worker must be registered, as a prefill worker, at the named address, with the CUDA IPC
handles and NIXL agent it registered. Against the real in-memory discovery."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from tandem.protocol import KvTransferParams
from tandem.protocol.transfer import CudaIpcCache, CudaIpcHandle, KvLayout, NixlCache
from tandem.protocol.worker import GENERATE_ENDPOINT, WORKER_COMPONENT
from tandem.runtime import InstanceInfo, MemoryDiscovery
from tandem.worker import kv_peers
from tandem.worker.kv_peers import KvPeerRefused, VerifiedKvSource, ipc_digest

LAYOUT = KvLayout(num_layers=1, block_size=4, num_kv_heads=1, head_dim=8, dtype="float32")


def ipc(handle: bytes) -> CudaIpcCache:
    h = CudaIpcHandle(device=0, handle=handle, storage_size=64, storage_offset=0,
                      ref_counter_handle=b"r", ref_counter_offset=0, event_handle=b"",
                      event_sync_required=False)  # fmt: skip
    return CudaIpcCache(node="n", device_uuid="gpu", shape=[1, 2, 4, 1, 8], k=h, v=h)


class Inner:
    layout = LAYOUT

    def __init__(self) -> None:
        self.fetched: list[str] = []
        self.released: list[str] = []

    async def fetch(self, params, indices, dst):
        self.fetched.append(params.worker_id)
        return "blocks"

    async def release(self, params):
        self.released.append(params.worker_id)


def info(worker: str, address: str, role: str = "prefill", **extra) -> InstanceInfo:
    return InstanceInfo(namespace="ns", component=WORKER_COMPONENT, endpoint=GENERATE_ENDPOINT,
                        instance_id=worker, address=address,
                        metadata={"role": role, **extra})  # fmt: skip


def params(worker: str, address: str, cache: CudaIpcCache | None = None) -> KvTransferParams:
    return KvTransferParams(request_id="r", block_ids=[0], num_tokens=2, token_ids=[1],
                            layout=LAYOUT, worker_id=worker, address=address,
                            cuda_ipc=cache)  # fmt: skip


def test_only_registered_prefill_workers_at_their_address(monkeypatch):
    monkeypatch.setattr(kv_peers, "RELIST_S", 0.0)

    async def main():
        discovery = MemoryDiscovery()
        await discovery.register(info("p", "127.0.0.1:1"))
        await discovery.register(info("d", "127.0.0.1:2", role="decode"))
        await discovery.register(info("q", "127.0.0.1:3", kv_ipc_digest=ipc_digest(ipc(b"a"))))
        inner = Inner()
        source = VerifiedKvSource(inner, discovery, "ns")
        assert await source.fetch(params("p", "127.0.0.1:1"), [0], [0]) == "blocks"
        assert await source.fetch(params("q", "127.0.0.1:3", ipc(b"a")), [0], [0]) == "blocks"
        refused = {
            "not registered": params("x", "127.0.0.1:1"),
            "not a prefill worker": params("d", "127.0.0.1:2"),
            "another address": params("p", "10.0.0.9:1"),
            "did not register": params("q", "127.0.0.1:3", ipc(b"forged")),
        }
        for why, forged in refused.items():
            with pytest.raises(KvPeerRefused, match=why):
                await source.fetch(forged, [0], [0])
            await source.release(forged)
        await source.release(params("p", "127.0.0.1:1"))
        assert inner.fetched == ["p", "q"] and inner.released == ["p"]
        assert source.refused == 4
        # A prefill worker that registers after the listing is found by the next miss.
        await discovery.register(info("late", "127.0.0.1:4"))
        assert await source.fetch(params("late", "127.0.0.1:4"), [0], [0]) == "blocks"
        await discovery.close()

    asyncio.run(main())


def test_only_the_nixl_agent_a_prefill_worker_registered():
    """A kv_import carrying another agent (its metadata or addresses) would make the decode
    worker read some other process's memory: refused."""
    agent = NixlCache(agent="a", metadata=b"ucx", mem_type="DRAM", device=0, k_addr=4096,
                      v_addr=8192, num_blocks=2)  # fmt: skip

    async def main():
        discovery = MemoryDiscovery()
        registered = {"kv_nixl": msgspec.to_builtins(agent)}
        await discovery.register(info("n", "127.0.0.1:5", **registered))
        source = VerifiedKvSource(Inner(), discovery, "ns")
        good = params("n", "127.0.0.1:5")
        good.nixl = agent
        assert await source.fetch(good, [0], [0]) == "blocks"
        for forged in (msgspec.structs.replace(agent, k_addr=0),
                       msgspec.structs.replace(agent, metadata=b"other")):  # fmt: skip
            bad = params("n", "127.0.0.1:5")
            bad.nixl = forged
            with pytest.raises(KvPeerRefused, match="NIXL agent"):
                await source.fetch(bad, [0], [0])
        await discovery.close()

    asyncio.run(main())


def test_a_flood_of_unknown_workers_lists_discovery_once_per_interval():
    async def main():
        discovery = MemoryDiscovery()
        listings = []
        real = discovery.list

        async def counted(prefix=""):
            listings.append(prefix)
            return await real(prefix)

        discovery.list = counted
        source = VerifiedKvSource(Inner(), discovery, "ns")
        for i in range(50):
            with pytest.raises(KvPeerRefused):
                await source.fetch(params(f"x{i}", "127.0.0.1:1"), [0], [0])
        assert listings == [f"ns.{WORKER_COMPONENT}.{GENERATE_ENDPOINT}"]
        await discovery.close()

    asyncio.run(main())


def test_the_prefill_worker_registers_its_ipc_digest(tiny_llama):
    from tandem.engine.async_engine import AsyncEngine
    from tandem.engine.config import EngineConfig
    from tandem.runtime import MemoryEventPlane, TcpRequestServer
    from tandem.worker import Worker, model_card
    from tandem.worker.kv_transport import KvTransport

    engine = AsyncEngine(EngineConfig(model=str(tiny_llama), num_gpu_blocks=16))
    try:
        cache = ipc(b"h")
        kv = KvTransport(["cuda-ipc"], cuda_ipc=cache)
        worker = Worker(engine, model_card(engine, "tiny", role="prefill"),
                        discovery=MemoryDiscovery(), events=MemoryEventPlane(),
                        server=TcpRequestServer(), kv=kv)  # fmt: skip
        assert worker.card.to_metadata()["kv_ipc_digest"] == ipc_digest(cache)
        assert ipc_digest(cache) == ipc_digest(msgspec.msgpack.decode(
            msgspec.msgpack.encode(cache), type=CudaIpcCache))  # fmt: skip
    finally:
        engine.shutdown()
