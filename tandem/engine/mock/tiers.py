"""The mock engine's host and disk KV tiers: which blocks each holds (LRU, bounded) and the
tier events a real engine's would publish, with no data; a load costs the modelled time of
its copy, which the mock runner adds to the step it precedes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from tandem.kvbm.tiers import Rate, RecomputeTime, slower_than_recompute
from tandem.protocol import KvBlock, KvEvent, KvRemoved, KvStored


class ModelledTier:
    def __init__(
        self,
        tier: str,
        capacity: int,
        emit: Callable[[KvEvent], None],
        on_evict: Callable[[int, int], None] | None = None,
    ) -> None:
        self.tier, self.capacity, self.emit, self.on_evict = tier, capacity, emit, on_evict
        self.blocks: OrderedDict[int, int] = OrderedDict()  # sequence hash -> local, LRU first

    def __contains__(self, sequence_hash: int) -> bool:
        return sequence_hash in self.blocks

    def put(self, sequence_hash: int, local_hash: int) -> None:
        if sequence_hash in self.blocks:
            self.blocks.move_to_end(sequence_hash)
            return
        if len(self.blocks) >= self.capacity:
            victim, local = self.blocks.popitem(last=False)
            self.emit(KvRemoved(event_id=0, sequence_hashes=[victim], tier=self.tier))
            if self.on_evict is not None:
                self.on_evict(victim, local)
        self.blocks[sequence_hash] = local_hash
        block = KvBlock(sequence_hash, local_hash)
        self.emit(KvStored(event_id=0, parent_sequence_hash=None, blocks=[block], tier=self.tier))

    def touch(self, sequence_hash: int) -> None:
        self.blocks.move_to_end(sequence_hash)


class ModelledTiers:
    """What `KvTiers` is to the block manager, for the mock: same calls, same events."""

    def __init__(
        self,
        host_blocks: int,
        disk_blocks: int,
        emit: Callable[[KvEvent], None],
        *,
        host_blocks_per_s: float,
        disk_blocks_per_s: float,
        recompute_s: RecomputeTime = lambda: None,
    ) -> None:
        self.disk = ModelledTier("disk", disk_blocks, emit) if disk_blocks else None
        on_evict = self.disk.put if self.disk is not None else None
        self.host = ModelledTier("host", host_blocks, emit, on_evict) if host_blocks else None
        self.rates = {"host": Rate(), "disk": Rate()}
        self.rates["host"].add(host_blocks_per_s, 1.0)
        self.rates["disk"].add(disk_blocks_per_s, 1.0)
        self.recompute_s = recompute_s
        self.hits = {"host": 0, "disk": 0}
        self.skipped = {"host": 0, "disk": 0}
        self.failed_loads = 0
        self.pending_s = 0.0  # modelled copy time of the loads since the last step

    def __contains__(self, sequence_hash: int) -> bool:
        return any(t is not None and sequence_hash in t for t in (self.host, self.disk))

    def offload(self, block_id: int, sequence_hash: int, local_hash: int) -> None:
        (self.host or self.disk).put(sequence_hash, local_hash)

    def onboard(
        self, sequence_hash: int, take_block: Callable[[], int], *, wait: bool = False
    ) -> int | None:
        tier = next((t for t in (self.host, self.disk) if t is not None and sequence_hash in t),
                    None)  # fmt: skip
        if tier is None:
            return None
        rate = self.rates[tier.tier]
        if slower_than_recompute(tier.tier, rate, self.recompute_s(), self.skipped):
            return None
        tier.touch(sequence_hash)
        self.hits[tier.tier] += 1
        self.pending_s += 1 / rate.value
        return take_block()

    def prefetch(self, hashes: list[int]) -> None:
        """Nothing to read ahead: a modelled load completes within the step."""

    def take_load_s(self) -> float:
        seconds, self.pending_s = self.pending_s, 0.0
        return seconds

    def snapshot(self) -> dict[str, list[int]]:
        return {t.tier: list(t.blocks) for t in (self.host, self.disk) if t is not None}
