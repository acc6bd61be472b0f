"""Host/TCP transport: the prefill worker streams an exported request's blocks over the request
plane (`kv_pull`), one layer and a few MiB per message, gathering the next message on a thread
while the event loop sends the last; the decode worker copies each message straight into the
blocks it reserved (no staging copy). `kv_release` frees the prefill side's copy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
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
from tandem.transfer.blocks import check_layout, read_blocks, write_blocks
from tandem.transfer.release import release_kv

log = logging.getLogger(__name__)

#: Bytes of K plus V per message: well under the request plane's 8 MiB frame limit.
CHUNK_BYTES = 4 * 1024 * 1024


class KvExportServer:
    """The prefill side: serves `kv_pull` and `kv_release` for one engine's exports."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.pulled_bytes = 0
        self._gather = ThreadPoolExecutor(1, thread_name_prefix="kv-gather")

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
        layout: KvLayout = self.engine.kv_layout
        step = max(1, CHUNK_BYTES // (2 * layout.layer_block_bytes))
        ids = np.array([blocks[i] for i in request.indices], dtype=np.int64)
        parts = [(layer, first) for layer in range(layout.num_layers)
                 for first in range(0, len(ids), step)]  # fmt: skip

        def gather(layer: int, first: int) -> KvChunk:
            part = ids[first : first + step]
            k, v = (read_blocks(c[layer], part) for c in caches)
            return KvChunk(layer=layer, first=first, count=len(part), k=k, v=v)

        loop = asyncio.get_running_loop()
        ahead = loop.run_in_executor(self._gather, gather, *parts[0])
        for i in range(len(parts)):
            chunk = await ahead
            if i + 1 < len(parts):  # gathered while this one is sent
                ahead = loop.run_in_executor(self._gather, gather, *parts[i + 1])
            self.pulled_bytes += len(chunk.k) + len(chunk.v)
            yield chunk
        await self.engine.touch_export(request.request_id)  # still held: nothing overwrote it

    async def release(self, request: KvReleaseRequest) -> AsyncIterator[KvReleased]:
        yield KvReleased(blocks=await self.engine.release_export(request.request_id))


class TcpKvSource:
    """The decode side: pulls blocks from the prefill worker at `params.address` into the
    blocks reserved for them in `caches()` (the engine's K and V; None: a mock, no data)."""

    def __init__(
        self,
        client: Any,
        layout: KvLayout,
        caches: Callable[[], tuple[torch.Tensor, torch.Tensor] | None],
        timeout: float = 10.0,
    ) -> None:
        self.client = client
        self.layout = layout
        self.caches = caches
        self.timeout = timeout

    async def fetch(self, params: KvTransferParams, indices: list[int], dst: list[int]) -> None:
        check_layout(self.layout, params.layout, f"worker {params.worker_id}")
        if len(dst) != len(indices):
            raise ValueError(f"{len(indices)} blocks to pull into {len(dst)} blocks")
        caches = self.caches()
        into = np.array(dst, dtype=np.int64) if caches is not None else None
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
                if into is None or not 0 <= chunk.layer < self.layout.num_layers:
                    raise ValueError(f"unexpected KV chunk for layer {chunk.layer}")
                rows = into[chunk.first : chunk.first + chunk.count]
                if len(rows) != chunk.count:
                    raise ValueError(f"KV chunk past the {len(dst)} blocks pulled")
                for cache, raw in zip(caches, (chunk.k, chunk.v), strict=True):
                    write_blocks(cache[chunk.layer], rows, raw)
                received += chunk.count
        if received != len(indices) * self.layout.num_layers and caches is not None:
            raise RuntimeError(
                f"KV pull ended after {received} of {len(indices) * self.layout.num_layers}"
                " layer-blocks"
            )

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

    async def confirm_held(self, params: KvTransferParams) -> None:
        """Before (and after) reading an export's blocks in place: the prefill worker still
        holds them, and they are the ones `params` names, whatever the request says."""
        if await self.touch(params) != params.block_ids:
            raise ValueError(
                f"kv_import lists blocks that worker {params.worker_id} does not hold for"
                f" request {params.request_id}"
            )

