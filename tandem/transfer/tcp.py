"""Host/TCP transport: the prefill worker streams an exported request's blocks over the request
plane (`kv_pull`), one layer and a few MiB per message; the decode worker stages them in host
memory, then its engine copies them into the cache. `kv_release` frees the prefill side's copy.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import torch

from tandem.protocol import KvLayout, KvTransferParams
from tandem.protocol.transfer import (
    KV_PULL_ENDPOINT,
    KV_RELEASE_ENDPOINT,
    KV_TOUCH_ENDPOINT,
    KvChunk,
    KvHeld,
    KvPullRequest,
    KvReleased,
    KvReleaseRequest,
)
from tandem.transfer.blocks import DTYPES, HostBlocks, check_layout
from tandem.transfer.release import release_kv

log = logging.getLogger(__name__)

#: Bytes of K plus V per message: well under the request plane's 8 MiB frame limit.
CHUNK_BYTES = 4 * 1024 * 1024


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (cast refuses a strided one)."""
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


class KvExportServer:
    """The prefill side: serves `kv_pull` and `kv_release` for one engine's exports."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.pulled_bytes = 0

    def add_endpoints(self, server: Any) -> None:
        server.add_endpoint(KV_PULL_ENDPOINT, self.pull, KvPullRequest)
        server.add_endpoint(KV_RELEASE_ENDPOINT, self.release, KvReleaseRequest)
        server.add_endpoint(KV_TOUCH_ENDPOINT, self.touch, KvReleaseRequest)

    async def touch(self, request: KvReleaseRequest) -> AsyncIterator[KvHeld]:
        yield KvHeld(block_ids=await self.engine.touch_export(request.request_id))

    async def pull(self, request: KvPullRequest) -> AsyncIterator[KvChunk]:
        """Every layer's K and V of the requested blocks, in chunks of up to CHUNK_BYTES."""
        blocks = await self.engine.touch_export(request.request_id)
        if any(not 0 <= i < len(blocks) for i in request.indices):
            raise ValueError(f"block indices out of range (the export has {len(blocks)})")
        caches = self.engine.kv_caches()
        if caches is None or not request.indices:  # the mock engine holds no KV data
            return
        k_cache, v_cache = caches
        layout: KvLayout = self.engine.kv_layout
        step = max(1, CHUNK_BYTES // (2 * layout.layer_block_bytes))
        ids = torch.tensor([blocks[i] for i in request.indices], device=k_cache.device)
        for layer in range(layout.num_layers):
            for first in range(0, len(ids), step):
                part = ids[first : first + step]
                k = k_cache[layer].index_select(0, part).cpu()
                v = v_cache[layer].index_select(0, part).cpu()
                self.pulled_bytes += 2 * k.numel() * k.element_size()
                yield KvChunk(layer=layer, first=first, count=len(part), k=_raw(k), v=_raw(v))
        await self.engine.touch_export(request.request_id)  # still held: nothing overwrote it

    async def release(self, request: KvReleaseRequest) -> AsyncIterator[KvReleased]:
        yield KvReleased(blocks=await self.engine.release_export(request.request_id))


class TcpKvSource:
    """The decode side: pulls blocks from the prefill worker at `params.address`."""

    def __init__(self, client: Any, layout: KvLayout, timeout: float = 10.0) -> None:
        self.client = client
        self.layout = layout
        self.timeout = timeout

    async def fetch(self, params: KvTransferParams, indices: list[int]) -> HostBlocks | None:
        check_layout(self.layout, params.layout, f"worker {params.worker_id}")
        lay = self.layout
        shape = (lay.num_layers, len(indices), lay.block_size, lay.num_kv_heads, lay.head_dim)
        dtype = DTYPES[lay.dtype]
        k = torch.empty(shape, dtype=dtype)
        v = torch.empty(shape, dtype=dtype)
        received = 0
        stream = self.client.call(
            params.address,
            KV_PULL_ENDPOINT,
            KvPullRequest(request_id=params.request_id, indices=indices),
            response_type=KvChunk,
            timeout=self.timeout,
        )
        async with stream:
            async for chunk in stream:
                rows = slice(chunk.first, chunk.first + chunk.count)
                _copy_into(k[chunk.layer, rows], chunk.k)
                _copy_into(v[chunk.layer, rows], chunk.v)
                received += chunk.count
        if received == 0 and indices:
            return None  # a mock engine: no data behind its blocks
        if received != len(indices) * lay.num_layers:
            raise RuntimeError(
                f"KV pull ended after {received} of {len(indices) * lay.num_layers} layer-blocks"
            )
        return HostBlocks(k, v)

    async def release(self, params: KvTransferParams) -> None:
        await release_kv(self.client, params)

    async def touch(self, params: KvTransferParams) -> list[int]:
        """The export's blocks, confirmed held for another full hold; RemoteError if gone."""
        stream = self.client.call(params.address, KV_TOUCH_ENDPOINT,
                                  KvReleaseRequest(request_id=params.request_id),
                                  response_type=KvHeld, timeout=self.timeout)  # fmt: skip
        async with stream:
            async for held in stream:
                return held.block_ids
        raise RuntimeError(f"worker {params.worker_id} did not answer kv_touch")


def _copy_into(dst: torch.Tensor, raw: Any) -> None:
    """Copy `raw` bytes over the contiguous tensor `dst`; a chunk of the wrong size is refused."""
    out = _raw(dst)
    data = memoryview(raw).cast("B")
    if len(data) != len(out):
        raise ValueError(f"KV chunk of {len(data)} bytes for {len(out)} bytes of blocks")
    out[:] = data
