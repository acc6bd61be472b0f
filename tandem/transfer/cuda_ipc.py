"""CUDA IPC: GPUs of one node. A prefill worker shares its K and V caches once (their handles
travel in every `KvTransferParams`); a decode worker on the same node maps them once per prefill
worker and copies blocks device to device, with no host staging. Handles are plain fields
(`CudaIpcHandle`), never pickled. Prefill workers on another node, or on a GPU this process
cannot see, are served by the TCP source instead.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from tandem.protocol import KvTransferParams
from tandem.protocol.transfer import CudaIpcCache, CudaIpcHandle
from tandem.transfer.blocks import DTYPES, CacheBlocks, check_layout

log = logging.getLogger(__name__)


@functools.cache
def node_id() -> str:
    """This machine's boot id: two processes share CUDA IPC only if it is the same."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _uuid(device: int) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def share_cache(k: torch.Tensor, v: torch.Tensor) -> CudaIpcCache:
    return CudaIpcCache(
        node=node_id(),
        device_uuid=_uuid(k.device.index or 0),
        shape=list(k.shape),
        k=_share(k),
        v=_share(v),
    )


def _share(t: torch.Tensor) -> CudaIpcHandle:
    if not t.is_contiguous() or t.storage_offset() != 0:
        raise ValueError("only a whole, contiguous cache tensor can be shared")
    device, handle, size, offset, rc_handle, rc_offset, event, sync = (
        t.untyped_storage()._share_cuda_()
    )
    return CudaIpcHandle(
        device=device,
        handle=handle,
        storage_size=size,
        storage_offset=offset,
        ref_counter_handle=rc_handle,
        ref_counter_offset=rc_offset,
        event_handle=event or b"",
        event_sync_required=sync,
    )


def local_device(cache: CudaIpcCache) -> int | None:
    """The index of the GPU holding `cache` as this process numbers it, or None."""
    if cache.node != node_id() or not torch.cuda.is_available():
        return None
    for i in range(torch.cuda.device_count()):
        if _uuid(i) == cache.device_uuid:
            return i
    return None


def open_cache(cache: CudaIpcCache, dtype: torch.dtype, device: int) -> tuple[torch.Tensor, ...]:
    """Map a shared K and V cache into this process."""
    return tuple(_open(h, cache.shape, dtype, device) for h in (cache.k, cache.v))


def _open(h: CudaIpcHandle, shape: list[int], dtype: torch.dtype, device: int) -> torch.Tensor:
    with torch.cuda.device(device):
        storage = torch.UntypedStorage._new_shared_cuda(
            device,
            h.handle,
            h.storage_size,
            h.storage_offset,
            h.ref_counter_handle,
            h.ref_counter_offset,
            h.event_handle or None,
            h.event_sync_required,
        )
        t = torch.empty(0, dtype=dtype, device=f"cuda:{device}")
        return t.set_(storage, 0, shape)


#: Prefill workers' caches kept mapped at once; the least recently pulled from is unmapped
#: first, so that workers that left (or restarted with a new cache) do not pin GPU memory.
MAX_MAPPED = 8


class CudaIpcKvSource:
    """Device-to-device pulls from prefill workers on this node; others go to `fallback`."""

    def __init__(self, fallback: Any, max_mapped: int = MAX_MAPPED) -> None:
        self.fallback = fallback  # a TcpKvSource: other nodes, and every release
        self.layout = fallback.layout
        self.max_mapped = max_mapped
        self._mapped: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()
        self.ipc_fetches = 0

    async def fetch(self, params: KvTransferParams, indices: list[int], dst: list[int]) -> Any:
        ipc = params.cuda_ipc
        device = local_device(ipc) if ipc is not None else None
        if ipc is None or device is None:
            return await self.fallback.fetch(params, indices, dst)
        check_layout(self.layout, params.layout, f"worker {params.worker_id}")
        # The blocks are read in place: the export must still hold them (a late pull would
        # copy reused blocks), and they must be the ones it holds, whatever the request says.
        await self.fallback.confirm_held(params)
        key = f"{params.worker_id}/{ipc.device_uuid}"
        caches = self._mapped.get(key)
        if caches is None:
            caches = open_cache(ipc, DTYPES[params.layout.dtype], device)
            self._mapped[key] = caches
            log.info("mapped the KV cache of worker %s through CUDA IPC", params.worker_id)
            while len(self._mapped) > self.max_mapped:
                gone, _ = self._mapped.popitem(last=False)
                log.info("unmapped the KV cache of %s (least recently used)", gone)
        self._mapped.move_to_end(key)
        self.ipc_fetches += 1
        return CacheBlocks(caches[0], caches[1], [params.block_ids[i] for i in indices])

    async def release(self, params: KvTransferParams) -> None:
        await self.fallback.release(params)

    def unmap(self) -> None:
        """Drop every mapped cache, so that the processes that own them can free them."""
        self._mapped.clear()
