"""Paged KV block allocation with prefix caching.

A block is identified, once full and computed, by its sequence hash (DESIGN.md), so any
later sequence whose prompt starts with the same tokens reuses it. Blocks nobody references
stay cached on the free list in LRU order and are evicted only when a fresh block is needed.
Every block that enters or leaves the cache becomes a KV event for routers. With `tiers`
(tandem.kvbm), an evicted block is copied down to host or disk first, and a prefix lookup
goes on there once the device has no more of it, loading what it finds into device blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from tandem.engine.sequence import Sequence
from tandem.kvbm.tiers import LOADING
from tandem.protocol import KvBlock, KvCleared, KvEvent, KvRemoved, KvSnapshot, KvStored
from tandem.protocol.hashing import chain_hash, local_hash, lora_seed

if TYPE_CHECKING:
    from tandem.kvbm.tiers import KvTiers


class Block:
    __slots__ = ("block_id", "hash", "local", "ref_count")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.local = 0  # its local hash, once `hash` is set


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks; the front is evicted first.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # sequence hash -> block id
        self.events: list[KvEvent] = []
        self._next_event_id = 0
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found cached
        self.tiers: KvTiers | None = None  # set by the engine once its KV caches exist

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_active_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix matching -------------------------------------------------------------

    def match_prefix(
        self, seq: Sequence, max_new_tokens: int | None = None, *, wait: bool = False
    ) -> list[int] | None:
        """Block ids of the longest cached prefix of `seq`, leaving at least one token to compute
        (its logits give the next token). Blocks come back from the tiers only if, with all of
        them loaded, the blocks for the next `max_new_tokens` (all the rest: None) fit too: a
        load for a request that must wait anyway would evict what others cache, and repeat
        every step while it waits. With `wait`, None while some of its prefix is being read
        from disk: ask again on a later step (the blocks loaded so far stay cached)."""
        if not self.enable_prefix_caching:
            return []
        self.update_hashes(seq, (seq.num_tokens - 1) // self.block_size)
        hits = []
        wanted = seq.block_hashes[: (seq.num_tokens - 1) // self.block_size]
        for h in wanted:
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        tiers_may_help = self.tiers is not None and len(hits) < len(wanted)
        if tiers_may_help and self._room_to_onboard(seq, hits, wanted, max_new_tokens):
            found = self._onboard(seq, hits, len(wanted), wait)
            if found is None:
                return None
            hits += found
        return hits

    def _room_to_onboard(
        self, seq: Sequence, hits: list[int], wanted: list[int], max_new_tokens: int | None
    ) -> bool:
        held = len(hits)
        while held < len(wanted) and (wanted[held] in self.cached or wanted[held] in self.tiers):
            held += 1
        end = seq.num_tokens
        if max_new_tokens is not None:
            end = min(end, held * self.block_size + max_new_tokens)
        unheld_hits = sum(1 for b in hits if b in self.free)  # free now, but taken as hits
        return self.blocks_needed(end) - len(hits) <= len(self.free) - unheld_hits

    def _onboard(
        self, seq: Sequence, hits: list[int], wanted: int, wait: bool
    ) -> list[int] | None:
        """Load the blocks after the device hits that the tiers hold into fresh device blocks,
        cached and unreferenced like any device hit (a later block the device still holds,
        evicted out of order, is taken as it is). The blocks found are held meanwhile so
        that taking fresh ones cannot evict them."""
        for bid in hits:
            self._ref(bid)
        found: list[int] = []
        loading = False
        for i in range(len(hits), wanted):
            h = seq.block_hashes[i]
            bid = self.cached.get(h)
            if bid is None:
                bid = self.tiers.onboard(h, self._take_fresh, wait=wait) if self.free else None
                if bid == LOADING:  # read the rest of the prefix meanwhile
                    self.tiers.prefetch(seq.block_hashes[i + 1 : wanted])
                    loading = True
                    break
                if bid is None:
                    break
                block = self.blocks[bid]
                block.hash, block.local = h, seq.local_hashes[i]
                self.cached[h] = bid
                parent = seq.block_hashes[i - 1] if i else None
                stored = [KvBlock(h, block.local)]
                self.emit(KvStored(event_id=0, parent_sequence_hash=parent, blocks=stored))
            else:
                self._ref(bid)
            found.append(bid)
        for bid in hits + found:
            self._unref(bid)
        return None if loading else found

    def update_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        """Extend seq.block_hashes to cover its first `num_full_blocks` blocks."""
        seed = lora_seed(seq.lora_name)
        b = self.block_size
        for i in range(len(seq.block_hashes), num_full_blocks):
            lh = local_hash(seq.token_ids[i * b : (i + 1) * b], seed)
            sh = lh if i == 0 else chain_hash(seq.block_hashes[i - 1], lh, seed)
            seq.local_hashes.append(lh)
            seq.block_hashes.append(sh)

    # -- allocation ------------------------------------------------------------------

    def allocate(self, seq: Sequence, num_new_tokens: int, hits: list[int] = ()) -> bool:
        """Give `seq` the blocks for its next `num_new_tokens` tokens, after taking the cached
        prefix `hits` (only on its first allocation). False, changing nothing, if they do not fit.
        """
        if not hits:  # the common case, a running sequence: often no new block at all
            fresh = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
            fresh -= len(seq.block_table)
            if fresh <= 0:
                return True
            if fresh > len(self.free):
                return False
            for _ in range(fresh):
                seq.block_table.append(self._take_fresh())
            return True
        hits = list(hits)
        total = seq.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        fresh = self.blocks_needed(total) - len(seq.block_table) - len(hits)
        reusable_hits = sum(1 for bid in hits if self.blocks[bid].ref_count == 0)
        if fresh + reusable_hits > len(self.free):
            return False
        for bid in hits:
            self._ref(bid)
        seq.block_table.extend(hits)
        if hits:
            seq.num_computed_tokens += len(hits) * self.block_size
        for _ in range(max(fresh, 0)):
            seq.block_table.append(self._take_fresh())
        return True

    def commit(self, seq: Sequence) -> None:
        """Cache the blocks that the last step filled, and publish them."""
        full = seq.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or full == seq.num_committed_blocks:
            return
        self.update_hashes(seq, full)
        new: list[KvBlock] = []
        parent: int | None = None
        for i in range(seq.num_committed_blocks, full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue
            h = seq.block_hashes[i]
            if h in self.cached:  # another sequence computed the same block first
                continue
            block.hash, block.local = h, seq.local_hashes[i]
            self.cached[h] = block.block_id
            if not new:
                parent = seq.block_hashes[i - 1] if i > 0 else None
            new.append(KvBlock(h, seq.local_hashes[i]))
        seq.num_committed_blocks = full
        if new:
            self.emit(KvStored(event_id=0, parent_sequence_hash=parent, blocks=new))

    def free_seq(self, seq: Sequence) -> None:
        """Release every block of `seq`; cached ones stay findable until evicted."""
        for bid in reversed(seq.block_table):
            self._unref(bid)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_committed_blocks = 0

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; only possible when no block is in use."""
        if self.num_active_blocks:
            return False
        for block in self.blocks:
            block.hash = None
        self.cached.clear()
        self.emit(KvCleared(event_id=0))
        return True

    def snapshot(self) -> KvSnapshot:
        """Every cached block, as of the last event emitted (the router's resync point)."""
        tiers = self.tiers.snapshot() if self.tiers is not None else {}
        return KvSnapshot(
            last_event_id=self._next_event_id - 1, blocks={"device": list(self.cached), **tiers}
        )

    def take_events(self) -> list[KvEvent]:
        events, self.events = self.events, []
        return events

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[block_id] = None
            if block.hash is None:  # worthless: reuse it before any cached block
                self.free.move_to_end(block_id, last=False)

    def _take_fresh(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.tiers is not None:
                self.tiers.offload(block_id, block.hash, block.local)
            del self.cached[block.hash]
            removed = block.hash
            block.hash = None
            last = self.events[-1] if self.events else None
            if isinstance(last, KvRemoved) and last.tier == "device":
                last.sequence_hashes.append(removed)
            else:
                self.emit(KvRemoved(event_id=0, sequence_hashes=[removed]))
        block.ref_count = 1
        return block_id

    def emit(self, event: KvEvent) -> None:
        """Number an event in this worker's one sequence (every tier's) and queue it."""
        event.event_id = self._next_event_id
        self._next_event_id += 1
        self.events.append(event)
