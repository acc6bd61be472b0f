"""A decode worker pulls KV only from prefill workers that discovery vouches for.

A `kv_import` arrives from a frontend and names where to pull from (address, CUDA IPC
handles, block ids). Taken on trust, a forged or stale one would point the decode worker's
GPU copies at any process's memory, or its TCP client at any host. So the source named must
be a prefill worker registered in discovery at that address, and CUDA IPC handles (by
digest) and a NIXL agent must be the ones it registered. Anything else is refused before a
byte moves, and the engine computes the prompt itself (its fallback for any failed
transfer); nothing is released at an address that was not verified.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

import msgspec

from tandem.protocol import KvTransferParams
from tandem.protocol.transfer import CudaIpcCache
from tandem.protocol.worker import GENERATE_ENDPOINT, WORKER_COMPONENT
from tandem.runtime import Discovery, InstanceInfo

log = logging.getLogger(__name__)

#: Seconds a discovery listing is trusted; a worker not in it triggers a fresh one, but at
#: most one every `RELIST_S` (a flood of forged ids costs one listing per interval).
LISTING_TTL_S = 5.0
RELIST_S = 0.5


class KvPeerRefused(ValueError):
    """A kv_import names a source that discovery does not vouch for."""


def ipc_digest(cache: CudaIpcCache) -> str:
    """What a prefill worker registers of its CUDA IPC handles, to be compared, not used."""
    return hashlib.sha256(msgspec.msgpack.encode(cache)).hexdigest()


class VerifiedKvSource:
    """Wraps a decode worker's KV source: fetch and release only from registered peers."""

    def __init__(self, source: Any, discovery: Discovery, namespace: str) -> None:
        self.source = source
        self.layout = source.layout
        self._discovery = discovery
        self._prefix = f"{namespace}.{WORKER_COMPONENT}.{GENERATE_ENDPOINT}"
        self._peers: dict[str, InstanceInfo] = {}
        self._listed_at = float("-inf")
        self._listing: asyncio.Task[None] | None = None
        self.refused = 0

    async def fetch(self, params: KvTransferParams, indices: list[int], dst: list[int]) -> Any:
        problem = await self._check(params)
        if problem is not None:
            self.refused += 1
            raise KvPeerRefused(f"kv_import refused: {problem}")
        return await self.source.fetch(params, indices, dst)

    async def release(self, params: KvTransferParams) -> None:
        if await self._check(params) is None:
            await self.source.release(params)

    async def _check(self, params: KvTransferParams) -> str | None:
        """Why `params` cannot be trusted, or None."""
        peer = self._peers.get(params.worker_id)
        stale = time.monotonic() - self._listed_at > LISTING_TTL_S
        if peer is None or stale:
            await self._relist(force=stale)
            peer = self._peers.get(params.worker_id)
        if peer is None:
            return f"worker {params.worker_id!r} is not registered"
        if peer.metadata.get("role") != "prefill":
            return f"worker {params.worker_id!r} is not a prefill worker"
        if peer.address != params.address:
            return f"worker {params.worker_id!r} is registered at another address"
        ipc = params.cuda_ipc
        if ipc is not None and peer.metadata.get("kv_ipc_digest") != ipc_digest(ipc):
            return f"CUDA IPC handles that worker {params.worker_id!r} did not register"
        nixl = params.nixl
        if nixl is not None and peer.metadata.get("kv_nixl") != msgspec.to_builtins(nixl):
            return f"a NIXL agent that worker {params.worker_id!r} did not register"
        return None

    async def _relist(self, force: bool) -> None:
        if self._listing is None:
            if not force and time.monotonic() - self._listed_at < RELIST_S:
                return
            self._listing = asyncio.ensure_future(self._list())
        listing = self._listing
        try:
            await asyncio.shield(listing)
        finally:
            if self._listing is listing and listing.done():
                self._listing = None

    async def _list(self) -> None:
        try:
            found = await self._discovery.list(self._prefix)
        except Exception as exc:  # discovery down: keep what we knew
            log.warning("listing prefill workers failed (%s); trusting the last listing", exc)
            found = list(self._peers.values())
        self._peers = {info.instance_id: info for info in found}
        self._listed_at = time.monotonic()
