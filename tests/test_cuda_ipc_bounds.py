"""The CUDA IPC source keeps at most `max_mapped` prefill caches mapped (least recently used
out first). Runs anywhere: the mapping itself is replaced by a stand-in."""

from __future__ import annotations

import asyncio

import torch

from tandem.protocol import KvTransferParams
from tandem.protocol.transfer import CudaIpcCache, CudaIpcHandle, KvLayout
from tandem.transfer import cuda_ipc

LAYOUT = KvLayout(num_layers=1, block_size=4, num_kv_heads=1, head_dim=8, dtype="float32")
HANDLE = CudaIpcHandle(device=0, handle=b"", storage_size=0, storage_offset=0,
                       ref_counter_handle=b"", ref_counter_offset=0, event_handle=b"",
                       event_sync_required=False)  # fmt: skip


class Fallback:
    layout = LAYOUT


def params(worker: str) -> KvTransferParams:
    cache = CudaIpcCache(node="n", device_uuid="gpu", shape=[1, 2, 4, 1, 8], k=HANDLE, v=HANDLE)
    return KvTransferParams(request_id="r", block_ids=[0], num_tokens=2, token_ids=[1],
                            layout=LAYOUT, worker_id=worker, cuda_ipc=cache)  # fmt: skip


def test_mapped_caches_are_bounded_least_recently_used_first(monkeypatch):
    opened = []
    monkeypatch.setattr(cuda_ipc, "local_device", lambda cache: 0)
    monkeypatch.setattr(cuda_ipc, "open_cache", lambda cache, dtype, device: opened.append(1)
                        or (torch.zeros(1), torch.zeros(1)))  # fmt: skip
    source = cuda_ipc.CudaIpcKvSource(Fallback(), max_mapped=2)

    async def main():
        for worker in ("a", "b", "a", "c", "a", "b"):
            await source.fetch(params(worker), [0])

    asyncio.run(main())
    # a, b mapped; a used again; c evicts b (the least recent); b maps again, evicting c.
    assert list(source._mapped) == ["a/gpu", "b/gpu"]
    assert len(opened) == 4 and source.ipc_fetches == 6
