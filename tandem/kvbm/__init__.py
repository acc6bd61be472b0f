"""KV block tiers beyond the engine's device pool: host memory and local disk (DESIGN.md).

A block keeps its identity (the sequence hash) and its geometry (`KvLayout`) in every tier;
its contents travel as one tensor `[2, layers, block_size, kv_heads, head_dim]`, K then V.
"""

from tandem.kvbm.disk import CorruptBlock, DiskTier
from tandem.kvbm.host import HostTier

__all__ = ["CorruptBlock", "DiskTier", "HostTier"]
