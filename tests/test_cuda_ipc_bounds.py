"""The CUDA IPC source confirms each export before reading it in place, and keeps at most
`max_mapped` prefill caches mapped (least recently used out first). Runs anywhere: the
mapping itself is replaced by a stand-in."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tandem.protocol import KvTransferParams
from tandem.protocol.transfer import CudaIpcCache, CudaIpcHandle, KvLayout
from tandem.transfer import cuda_ipc
from tandem.transfer.tcp import TcpKvSource

LAYOUT = KvLayout(num_layers=1, block_size=4, num_kv_heads=1, head_dim=8, dtype="float32")
HANDLE = CudaIpcHandle(device=0, handle=b"", storage_size=0, storage_offset=0,
                       ref_counter_handle=b"", ref_counter_offset=0, event_handle=b"",
                       event_sync_required=False)  # fmt: skip


class Fallback:
    """The TCP source's `touch` (the export's blocks, or an error once it is gone), under its
    real `confirm_held`."""

    layout = LAYOUT
    confirm_held = TcpKvSource.confirm_held

    def __init__(self, held=None) -> None:
        self.held = held
        self.touched = 0

    async def touch(self, params):
        self.touched += 1
        if isinstance(self.held, Exception):
            raise self.held
        return params.block_ids if self.held is None else self.held


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
            await source.fetch(params(worker), [0], [0])

    asyncio.run(main())
    # a, b mapped; a used again; c evicts b (the least recent); b maps again, evicting c.
    assert list(source._mapped) == ["a/gpu", "b/gpu"]
    assert len(opened) == 4 and source.ipc_fetches == 6


def test_an_export_is_confirmed_before_its_blocks_are_read(monkeypatch):
    monkeypatch.setattr(cuda_ipc, "local_device", lambda cache: 0)
    monkeypatch.setattr(cuda_ipc, "open_cache", lambda *a: (torch.zeros(1), torch.zeros(1)))
    fallback = Fallback()
    source = cuda_ipc.CudaIpcKvSource(fallback)
    blocks = asyncio.run(source.fetch(params("a"), [0], [0]))
    assert fallback.touched == 1 and blocks is not None
    # Blocks the prefill worker does not hold for this request (a forged or stale import).
    with pytest.raises(ValueError, match="does not hold"):
        asyncio.run(cuda_ipc.CudaIpcKvSource(Fallback(held=[7])).fetch(params("a"), [0], [0]))
    # An export released or expired: nothing is read.
    gone = Fallback(held=KeyError("released"))
    with pytest.raises(KeyError):
        asyncio.run(cuda_ipc.CudaIpcKvSource(gone).fetch(params("a"), [0], [0]))
