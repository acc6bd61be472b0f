"""The host and disk tiers under one engine's device pool: where the prefix cache's evicted
blocks go, and where a prefix lookup goes on once the device pool has no more of it.

On CUDA the copies between the device and the (pinned) host tier are queued on the engine's
stream and never wait: an offload runs before any later kernel can overwrite the evicted
block, an onboard before the prefill that reads it; a host block is read on the CPU (for the
disk tier) only once its copy has finished. Disk I/O is synchronous in this version."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from tandem.kvbm.disk import CorruptBlock, DiskTier
from tandem.kvbm.host import HostTier
from tandem.protocol import KvEvent, KvLayout

log = logging.getLogger(__name__)

Caches = tuple[torch.Tensor, torch.Tensor]  # K, V: [layers, blocks, block_size, heads, dim]


class KvTiers:
    def __init__(self, host: HostTier | None, disk: DiskTier | None, caches: Caches) -> None:
        if host is None and disk is None:
            raise ValueError("KvTiers needs a host or a disk tier")
        self.host, self.disk = host, disk
        self.k_cache, self.v_cache = caches
        self.hits = {"host": 0, "disk": 0}  # blocks onboarded, by the tier they came from
        self.failed_loads = 0  # disk blocks refused (corrupt or unreadable): recomputed

    @classmethod
    def build(
        cls,
        layout: KvLayout,
        model: str,
        caches: Caches,
        emit: Callable[[KvEvent], None],
        *,
        host_bytes: int,
        disk_path: str | Path | None,
        disk_bytes: int,
    ) -> KvTiers:
        disk = DiskTier(disk_path, model, layout, disk_bytes, emit) if disk_path else None
        host = None
        if host_bytes:
            host = HostTier(layout, host_bytes, emit, pin_memory=caches[0].is_cuda,
                            on_evict=disk.put if disk is not None else None)  # fmt: skip
        return cls(host, disk, caches)

    def __contains__(self, sequence_hash: int) -> bool:
        return (self.host is not None and sequence_hash in self.host) or (
            self.disk is not None and sequence_hash in self.disk
        )

    def offload(self, block_id: int, sequence_hash: int, local_hash: int) -> None:
        """Copy a device block down before its slot is reused: to host (whose evictions go to
        disk), or straight to disk without a host tier."""
        contents = torch.stack([self.k_cache[:, block_id], self.v_cache[:, block_id]])
        if self.host is not None:
            if not self.host.put(sequence_hash, local_hash, contents) and self.disk is not None:
                self.disk.put(sequence_hash, local_hash, contents)
        else:
            self.disk.put(sequence_hash, local_hash, contents)

    def onboard(self, sequence_hash: int, take_block: Callable[[], int]) -> int | None:
        """Load a block from the nearest tier that holds it into the device block that
        `take_block` gives, and return that block; None when no tier holds it or its disk file
        failed its checks (logged, counted, dropped), and then no block is taken."""
        if self.host is not None and sequence_hash in self.host:
            self.host.pin(sequence_hash)  # taking a block may offload into the host tier
            try:
                block_id = take_block()
                self._write(block_id, self.host.get(sequence_hash))
            finally:
                self.host.unpin(sequence_hash)
            self.hits["host"] += 1
            return block_id
        if self.disk is None or sequence_hash not in self.disk:
            return None
        try:
            contents = self.disk.get(sequence_hash)
        except CorruptBlock as exc:
            self.failed_loads += 1
            log.warning("KV onboard falls back to recompute: %s", exc)
            return None
        block_id = take_block()
        self._write(block_id, contents)
        self.hits["disk"] += 1
        return block_id

    def _write(self, block_id: int, contents: torch.Tensor) -> None:
        """Place contents in a device block: on CUDA one host-to-device copy, queued on the
        engine's stream behind the step that is running (from pinned memory it does not
        wait), and ahead of the prefill that reads it."""
        staged = contents.to(self.k_cache.device, non_blocking=True)
        self.k_cache[:, block_id].copy_(staged[0])
        self.v_cache[:, block_id].copy_(staged[1])

    def snapshot(self) -> dict[str, list[int]]:
        out = {}
        if self.host is not None:
            out["host"] = self.host.snapshot()
        if self.disk is not None:
            out["disk"] = self.disk.snapshot()
        return out
