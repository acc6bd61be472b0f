"""The host and disk tiers under one engine's device pool: where the prefix cache's evicted
blocks go, and where a prefix lookup goes on once the device pool has no more of it.

On CUDA the copies between the device and the (pinned) host tier are queued on the engine's
stream and never wait: an offload runs before any later kernel can overwrite the evicted
block, an onboard before the prefill that reads it; a host block is read on the CPU (for the
disk tier) only once its copy has finished. Disk writes run behind on a writer thread
(`DiskTier`); the reads of a request that waits for its prefix run on an I/O thread."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from tandem.kvbm.disk import CorruptBlock, DiskTier
from tandem.kvbm.host import HostTier
from tandem.protocol import KvEvent, KvLayout

log = logging.getLogger(__name__)

Caches = tuple[torch.Tensor, torch.Tensor]  # K, V: [layers, blocks, block_size, heads, dim]
#: `onboard(..., wait=True)`'s answer while a disk read is in flight.
LOADING = -1
#: Disk reads in flight or done and not yet taken, at most (~2 MiB each for an 8B model).
MAX_READS = 256


def _timed_read(disk: DiskTier, sequence_hash: int) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    contents = disk.read(sequence_hash)
    return contents, time.perf_counter() - started


#: Seconds to recompute one block from the engine's measured prefill rate; None: unknown.
RecomputeTime = Callable[[], "float | None"]


class Rate:
    """Amount per second (blocks loaded, prompt tokens computed) over recent samples,
    weighted by their duration: each new sample keeps `decay` of the history. 0 until the
    first sample."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay, self.amount, self.seconds = decay, 0.0, 0.0

    def add(self, amount: float, seconds: float) -> None:
        if amount > 0 and seconds > 0:
            self.amount = self.amount * self.decay + amount
            self.seconds = self.seconds * self.decay + seconds

    @property
    def value(self) -> float:
        return self.amount / self.seconds if self.seconds else 0.0


def slower_than_recompute(
    tier: str, rate: Rate, recompute_s: float | None, skipped: dict[str, int]
) -> bool:
    """Whether a load from `tier` is measured slower than recomputing the block (counted in
    `skipped`, logged the first time); False while either is unknown."""
    if not rate.value or recompute_s is None or 1 / rate.value <= recompute_s:
        return False
    if not skipped[tier]:
        log.info("%s tier loads take %.3f ms a block, recomputing %.3f ms: recomputing",
                 tier, 1e3 / rate.value, recompute_s * 1e3)  # fmt: skip
    skipped[tier] += 1
    return True


class KvTiers:
    """Loads come from a tier only while they are faster than recomputing the block (both
    measured: on an H200 an 8B model recomputes 16 tokens faster than a disk block loads)."""

    def __init__(
        self,
        host: HostTier | None,
        disk: DiskTier | None,
        caches: Caches,
        recompute_s: RecomputeTime = lambda: None,
    ) -> None:
        if host is None and disk is None:
            raise ValueError("KvTiers needs a host or a disk tier")
        self.host, self.disk = host, disk
        self.k_cache, self.v_cache = caches
        self.recompute_s = recompute_s
        self.hits = {"host": 0, "disk": 0}  # blocks onboarded, by the tier they came from
        self.failed_loads = 0  # disk blocks refused (corrupt or unreadable): recomputed
        self.rates = {"host": Rate(), "disk": Rate()}
        self.skipped = {"host": 0, "disk": 0}  # loads not taken: recomputing was faster
        # On CUDA a host load is queued, not waited for: its rate is a probe's, taken once.
        self._host_queued = host is not None and self.k_cache.is_cuda
        if self._host_queued:
            self._probe_host()
        # Disk reads in flight for `onboard(..., wait=True)`, oldest first, at most MAX_READS.
        self._reads: OrderedDict[int, Future] = OrderedDict()
        self._io = ThreadPoolExecutor(1, "kv-disk-read") if disk is not None else None

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
        recompute_s: RecomputeTime = lambda: None,
    ) -> KvTiers:
        disk = DiskTier(disk_path, model, layout, disk_bytes, emit) if disk_path else None
        host = None
        if host_bytes:
            host = HostTier(layout, host_bytes, emit, pin_memory=caches[0].is_cuda,
                            on_evict=disk.put if disk is not None else None)  # fmt: skip
        return cls(host, disk, caches, recompute_s)

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

    def onboard(
        self, sequence_hash: int, take_block: Callable[[], int], *, wait: bool = False
    ) -> int | None:
        """Load a block from the nearest tier that holds it into the device block that
        `take_block` gives, and return that block; None when no tier holds it, loading is
        slower than recomputing, or its disk file failed its checks (logged, counted,
        dropped), and then no block is taken. With `wait`, a disk block is read on an I/O
        thread and the answer is `LOADING` until the read is done (`prefetch` starts
        reads for the blocks after it): the engine steps the others meanwhile. Without, a
        read in flight is waited for."""
        started = time.perf_counter()
        if self.host is not None and sequence_hash in self.host:
            if self._slower_than_recompute("host"):
                return None
            self.host.pin(sequence_hash)  # taking a block may offload into the host tier
            try:
                block_id = take_block()
                self._write(block_id, self.host.get(sequence_hash))
            finally:
                self.host.unpin(sequence_hash)
            self._loaded("host", None if self._host_queued else started)
            return block_id
        if self.disk is None or sequence_hash not in self.disk:
            self._reads.pop(sequence_hash, None)  # read before the block was dropped
            return None
        if self._slower_than_recompute("disk"):
            return None
        read = self._reads.get(sequence_hash)
        if wait and (read is None or not read.done()):
            self.prefetch([sequence_hash])
            return LOADING
        self._reads.pop(sequence_hash, None)
        try:
            if read is not None:  # done, or waited for here: nothing else is running
                contents, seconds = read.result()
                self.disk.files.move_to_end(sequence_hash)
            else:
                contents, seconds = self.disk.get(sequence_hash), None
        except CorruptBlock as exc:
            self.failed_loads += 1
            self.disk.drop(sequence_hash)
            log.warning("KV onboard falls back to recompute: %s", exc)
            return None
        block_id = take_block()
        self._write(block_id, contents)
        self._loaded("disk", started if seconds is None else None)
        if seconds is not None:  # the read's own time on its thread, not the wait for it
            self.rates["disk"].add(1, seconds)
        return block_id

    def prefetch(self, hashes: list[int]) -> None:
        """Start I/O-thread reads of the disk blocks among `hashes` not read yet (the oldest
        reads beyond MAX_READS are forgotten: a request that left does not pin memory)."""
        for h in hashes:
            if h in self._reads or h not in self.disk:
                continue
            while len(self._reads) >= MAX_READS:
                self._reads.popitem(last=False)[1].cancel()
            self._reads[h] = self._io.submit(_timed_read, self.disk, h)

    def _loaded(self, tier: str, started: float | None) -> None:
        self.hits[tier] += 1
        if started is not None:
            self.rates[tier].add(1, time.perf_counter() - started)

    def _slower_than_recompute(self, tier: str) -> bool:
        return slower_than_recompute(tier, self.rates[tier], self.recompute_s(), self.skipped)

    def _probe_host(self, blocks: int = 8) -> None:
        """Time pinned-to-device copies of one host slot, waited for: the host tier's rate."""
        slot = self.host.data[0]
        torch.cuda.synchronize(self.k_cache.device)
        started = time.perf_counter()
        for _ in range(blocks):
            slot.to(self.k_cache.device, non_blocking=True)
        torch.cuda.synchronize(self.k_cache.device)
        self.rates["host"].add(blocks, time.perf_counter() - started)

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
