"""KV events and load figures that workers publish for routers (spec in DESIGN.md)."""

from __future__ import annotations

from typing import Literal

import msgspec

Tier = Literal["device", "host", "disk"]


class KvBlock(msgspec.Struct, array_like=True):
    sequence_hash: int
    local_hash: int


class KvStored(msgspec.Struct, tag="stored", kw_only=True):
    event_id: int
    parent_sequence_hash: int | None
    blocks: list[KvBlock]
    tier: Tier = "device"


class KvRemoved(msgspec.Struct, tag="removed", kw_only=True):
    event_id: int
    sequence_hashes: list[int]
    tier: Tier = "device"


class KvCleared(msgspec.Struct, tag="cleared", kw_only=True):
    event_id: int


KvEvent = KvStored | KvRemoved | KvCleared


class KvSnapshot(msgspec.Struct, kw_only=True):
    """Every block a worker holds, per tier, as of its event `last_event_id` (-1: before any
    event). A router that missed events replaces what it knew with this, then applies the
    events after `last_event_id`."""

    last_event_id: int
    blocks: dict[Tier, list[int]]


class LoadStats(msgspec.Struct, kw_only=True):
    """A worker's load at one instant: what the router and the planner balance on."""

    active_blocks: int
    free_blocks: int
    total_blocks: int
    num_running: int
    num_waiting: int
    queued_prefill_tokens: int
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Disaggregation, counted since start: imports done, imports that fell back to computing
    # the prompt locally, exports freed by their deadline (no decode worker confirmed).
    kv_imports: int = 0
    kv_import_fallbacks: int = 0
    kv_exports_expired: int = 0
    # KV tiers, counted since start: blocks loaded back from host and from disk, and disk
    # blocks refused (corrupt or unreadable) and recomputed.
    kv_host_hits: int = 0
    kv_disk_hits: int = 0
    kv_tier_load_failures: int = 0
    # Measured rates for a router's cost in seconds (0: not measured yet; a pool's sum is its
    # capacity): prompt tokens computed per second of step time, KV blocks loaded back per
    # second from the host and the disk tier.
    prefill_tokens_per_s: float = 0.0
    host_blocks_per_s: float = 0.0
    disk_blocks_per_s: float = 0.0

    @property
    def kv_usage(self) -> float:
        return self.active_blocks / self.total_blocks if self.total_blocks else 0.0
