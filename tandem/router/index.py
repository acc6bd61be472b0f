"""`KvIndex`: which worker holds which KV block, in which tier, fed by the workers' KV events.

A request's overlap with a worker is the number of its leading blocks that worker holds (a
block is only reusable if every block before it is too). Each worker gets one bit; each
block hash maps to a bitmask of its holders per tier, so walking a request's chain is one
integer AND per block whatever the number of workers: the walk over 512 blocks and 64 workers
costs tens of microseconds, where sets of worker ids would cost a millisecond.

Per worker the index also keeps its hashes (to drop them when the worker leaves) and the next
event id it expects: a gap means lost events, and the caller must fetch a snapshot and
`replace()` the worker's blocks. Memory is bounded by `max_blocks_per_worker`: a worker whose
events would exceed it is reset and treated like a gap (its events are inconsistent).

Approximate mode (engines that publish no events): `predict()` records the blocks a request
routed to a worker will have computed, expiring after a TTL.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable, Sequence

from tandem.protocol import KvCleared, KvEvent, KvRemoved, KvStored
from tandem.protocol.events import Tier

TIERS: tuple[Tier, ...] = ("device", "host", "disk")
#: Credit of a cached block by tier (DESIGN.md): onboarding from host or disk is not free.
TIER_WEIGHTS: dict[Tier, float] = {"device": 1.0, "host": 0.75, "disk": 0.25}
_TIER_BIT = {tier: 1 << i for i, tier in enumerate(TIERS)}
#: A block only in host memory or on disk is worth this much less than one on the device.
HOST_DISCOUNT, DISK_DISCOUNT = 1.0 - TIER_WEIGHTS["host"], 1.0 - TIER_WEIGHTS["disk"]
_NONE_BELOW = (0, 0)

#: Bytes per (block, worker) entry that `approx_bytes` reports: an upper bound. Measured with
#: tracemalloc on CPython 3.11: 113 when every worker holds distinct blocks (8 workers x 8,192),
#: 45 when 64 workers share theirs (the per-block holder masks are then shared).
ENTRY_BYTES = 120


class Overlap:
    """A request's overlap with each worker: leading blocks held, their tier-weighted sum,
    and how many of them are held only in host memory and only on disk."""

    __slots__ = ("blocks", "lower", "weighted")

    def __init__(self) -> None:
        self.blocks: dict[str, int] = {}
        self.weighted: dict[str, float] = {}
        self.lower: dict[str, tuple[int, int]] = {}  # (host, disk) blocks; absent: none


class _Worker:
    __slots__ = ("bit", "expected_event", "hashes")

    def __init__(self, bit: int) -> None:
        self.bit = bit
        self.hashes: dict[int, int] = {}  # sequence hash -> tier bits
        self.expected_event: int | None = None  # None: in sync from whatever comes next


class KvIndex:
    def __init__(self, max_blocks_per_worker: int = 1 << 20) -> None:
        self.max_blocks_per_worker = max_blocks_per_worker
        self._workers: dict[str, _Worker] = {}
        self._by_bit: dict[int, str] = {}
        self._free_bits: list[int] = []
        self._holders: dict[int, int] = {}  # sequence hash -> bitmask of workers (any tier)
        self._lower: dict[Tier, dict[int, int]] = {"host": {}, "disk": {}}  # non-device holders
        self._predicted: list[tuple[float, str, int]] = []  # (expiry, worker, hash) heap
        self._expiry: dict[tuple[str, int], float] = {}  # latest expiry of each prediction

    # -- workers -----------------------------------------------------------------------

    @property
    def workers(self) -> list[str]:
        return list(self._workers)

    def add_worker(self, worker_id: str) -> None:
        if worker_id not in self._workers:
            bit = 1 << (heapq.heappop(self._free_bits) if self._free_bits else len(self._workers))
            self._workers[worker_id] = _Worker(bit)
            self._by_bit[bit] = worker_id

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker and every block it held."""
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return
        self._drop_all(worker)
        del self._by_bit[worker.bit]
        heapq.heappush(self._free_bits, worker.bit.bit_length() - 1)

    # -- events ------------------------------------------------------------------------

    def apply(self, worker_id: str, events: Iterable[KvEvent]) -> bool:
        """Apply a worker's events in order. False if an event id is missing (the caller must
        fetch a snapshot and `replace()`), or the worker outgrew its bound; events up to the
        gap are applied."""
        self.add_worker(worker_id)
        worker = self._workers[worker_id]
        for event in events:
            expected = worker.expected_event
            if expected is not None and event.event_id < expected:
                continue  # already covered by a snapshot
            if expected is not None and event.event_id > expected:
                return False
            if expected is None and event.event_id > 0:
                return False  # joined late: what came before is unknown
            worker.expected_event = event.event_id + 1
            if isinstance(event, KvStored):
                self._store(worker, (b.sequence_hash for b in event.blocks), event.tier)
            elif isinstance(event, KvRemoved):
                self._remove(worker, event.sequence_hashes, event.tier)
            elif isinstance(event, KvCleared):
                self._drop_all(worker)
            if len(worker.hashes) > self.max_blocks_per_worker:
                self._drop_all(worker)
                worker.expected_event = None
                return False
        return True

    def replace(self, worker_id: str, last_event_id: int, blocks: dict[Tier, list[int]]) -> None:
        """A snapshot: the worker holds exactly `blocks` as of event `last_event_id` (-1: none
        yet); later events apply on top of it."""
        self.add_worker(worker_id)
        worker = self._workers[worker_id]
        self._drop_all(worker)
        for tier, hashes in blocks.items():
            self._store(worker, hashes, tier)
        worker.expected_event = last_event_id + 1

    def in_sync(self, worker_id: str) -> bool:
        worker = self._workers.get(worker_id)
        return worker is not None and worker.expected_event is not None

    # -- approximate mode -------------------------------------------------------------

    def predict(self, worker_id: str, hashes: Sequence[int], ttl: float) -> None:
        """Record that `worker_id` will hold `hashes` (device) for `ttl` seconds."""
        self.add_worker(worker_id)
        self._store(self._workers[worker_id], hashes, "device")
        expiry = time.monotonic() + ttl
        for h in hashes:
            self._expiry[worker_id, h] = expiry
            heapq.heappush(self._predicted, (expiry, worker_id, h))

    def expire(self, now: float | None = None) -> int:
        """Drop predictions past their TTL; how many."""
        now = time.monotonic() if now is None else now
        dropped = 0
        while self._predicted and self._predicted[0][0] <= now:
            expiry, worker_id, h = heapq.heappop(self._predicted)
            if self._expiry.get((worker_id, h)) != expiry:
                continue  # predicted again later: that entry decides
            del self._expiry[worker_id, h]
            worker = self._workers.get(worker_id)
            if worker is not None:
                self._remove(worker, [h], "device")
                dropped += 1
        return dropped

    # -- queries -----------------------------------------------------------------------

    def overlap(self, hashes: Iterable[int]) -> Overlap:
        """Per worker holding at least the first block: leading blocks held, tier-weighted.

        `hashes` is consumed only as far as some worker still matches, so a lazy iterator
        saves hashing the uncached tail of a prompt."""
        result = Overlap()
        get = self._holders.get
        it = iter(hashes)
        first = next(it, None)
        active = 0 if first is None else get(first, 0)
        if not active:
            return result
        lower = [(i, m) for i, m in enumerate(self._lower.values()) if m]
        discount: dict[int, list[int]] = {}  # worker bit -> [host, disk] blocks so far
        if lower:
            self._discount(active, first, lower, discount)
        depth = 1
        for h in it:
            nxt = active & get(h, 0)
            if nxt != active:
                self._record(active & ~nxt, depth, discount, result)
                if not nxt:
                    return result
                active = nxt
            if lower:
                self._discount(active, h, lower, discount)
            depth += 1
        self._record(active, depth, discount, result)
        return result

    def _discount(
        self, active: int, h: int, lower: list[tuple[int, dict[int, int]]], out: dict[int, list]
    ) -> None:
        """Count block `h` for the workers whose best copy of it is below device, by tier."""
        for tier, masks in lower:
            below = active & masks.get(h, 0)
            while below:
                bit = below & -below
                below ^= bit
                out.setdefault(bit, [0, 0])[tier] += 1

    def _record(self, gone: int, depth: int, discount: dict[int, list], result: Overlap) -> None:
        """Workers in `gone` matched exactly `depth` leading blocks."""
        while gone:
            bit = gone & -gone
            gone ^= bit
            worker_id = self._by_bit[bit]
            result.blocks[worker_id] = depth
            host, disk = discount.get(bit, _NONE_BELOW)
            if host or disk:
                result.lower[worker_id] = (host, disk)
            result.weighted[worker_id] = depth - HOST_DISCOUNT * host - DISK_DISCOUNT * disk

    def num_blocks(self, worker_id: str | None = None) -> int:
        """Entries held, for one worker or all."""
        if worker_id is not None:
            worker = self._workers.get(worker_id)
            return len(worker.hashes) if worker else 0
        return sum(len(w.hashes) for w in self._workers.values())

    def approx_bytes(self) -> int:
        return self.num_blocks() * ENTRY_BYTES

    # -- internals ---------------------------------------------------------------------

    def _store(self, worker: _Worker, hashes: Iterable[int], tier: Tier) -> None:
        bit, tier_bit = worker.bit, _TIER_BIT[tier]
        holders, own = self._holders, worker.hashes
        for h in hashes:
            own[h] = own.get(h, 0) | tier_bit
            holders[h] = holders.get(h, 0) | bit
            self._update_lower(worker, h)

    def _remove(self, worker: _Worker, hashes: Iterable[int], tier: Tier) -> None:
        own, tier_bit = worker.hashes, _TIER_BIT[tier]
        for h in hashes:
            tiers = own.get(h, 0) & ~tier_bit
            if tiers:
                own[h] = tiers
                self._update_lower(worker, h)
            elif h in own:
                del own[h]
                self._clear_bit(worker, h)

    def _drop_all(self, worker: _Worker) -> None:
        for h in worker.hashes:
            self._clear_bit(worker, h)
        worker.hashes = {}

    def _clear_bit(self, worker: _Worker, h: int) -> None:
        mask = self._holders.get(h, 0) & ~worker.bit
        if mask:
            self._holders[h] = mask
        else:
            self._holders.pop(h, None)
        for masks in self._lower.values():
            self._unset(masks, h, worker.bit)

    def _update_lower(self, worker: _Worker, h: int) -> None:
        """Keep `_lower[tier]` = workers whose best copy of `h` is in that tier."""
        tiers = worker.hashes[h]
        best = next(t for t in TIERS if tiers & _TIER_BIT[t])
        for tier, masks in self._lower.items():
            if tier == best:
                masks[h] = masks.get(h, 0) | worker.bit
            else:
                self._unset(masks, h, worker.bit)

    @staticmethod
    def _unset(masks: dict[int, int], h: int, bit: int) -> None:
        mask = masks.get(h)
        if mask is not None and mask & bit:
            if mask == bit:
                del masks[h]
            else:
                masks[h] = mask & ~bit
