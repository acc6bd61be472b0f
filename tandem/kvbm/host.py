"""The host tier: a fixed pool of KV blocks in (pinned, on CUDA) host memory, LRU-evicted."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from tandem.protocol import KvBlock, KvEvent, KvLayout, KvRemoved, KvStored

#: Called with (sequence_hash, local_hash, contents) for a block about to leave the host
#: tier, before its slot is reused: where the disk tier takes it.
Evicted = Callable[[int, int, torch.Tensor], None]


def block_shape(layout: KvLayout) -> tuple[int, ...]:
    """One block's contents: K and V over every layer."""
    return (2, layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim)


class HostTier:
    """`capacity_bytes` of blocks in one preallocated tensor; nothing grows with traffic.

    A block being loaded (`pin`) is never evicted; when every slot is pinned, `put` refuses.
    Every block that enters or leaves becomes an event through `emit` (the engine numbers
    them with its device events)."""

    tier = "host"

    def __init__(
        self,
        layout: KvLayout,
        capacity_bytes: int,
        emit: Callable[[KvEvent], None],
        *,
        pin_memory: bool = False,
        on_evict: Evicted | None = None,
    ) -> None:
        self.capacity = capacity_bytes // layout.block_bytes
        if self.capacity < 1:
            raise ValueError(
                f"a host tier of {capacity_bytes} bytes holds no block of {layout.block_bytes}"
            )
        self.layout = layout
        shape = (self.capacity, *block_shape(layout))
        self.data = torch.empty(shape, dtype=getattr(torch, layout.dtype), pin_memory=pin_memory)
        self.slots: OrderedDict[int, int] = OrderedDict()  # sequence hash -> slot, LRU first
        self.local_hashes: dict[int, int] = {}
        self.free_slots = list(range(self.capacity - 1, -1, -1))
        self.pins: dict[int, int] = {}  # sequence hash -> loads in progress
        self.emit = emit
        self.on_evict = on_evict
        self.copied: dict[int, torch.cuda.Event] = {}  # slot -> its copy from the device

    def __contains__(self, sequence_hash: int) -> bool:
        return sequence_hash in self.slots

    def __len__(self) -> int:
        return len(self.slots)

    def put(self, sequence_hash: int, local_hash: int, contents: torch.Tensor) -> bool:
        """Copy a block in (a block already here only turns most recent). False when every
        slot holds a block being loaded."""
        if sequence_hash in self.slots:
            self.slots.move_to_end(sequence_hash)
            return True
        slot = self._free_slot()
        if slot is None:
            return False
        self.data[slot].copy_(contents, non_blocking=True)
        if contents.is_cuda:  # the CPU may read the slot only once the copy is done
            self.copied[slot] = torch.cuda.Event()
            self.copied[slot].record()
        self.slots[sequence_hash] = slot
        self.local_hashes[sequence_hash] = local_hash
        block = KvBlock(sequence_hash, local_hash)
        self.emit(KvStored(event_id=0, parent_sequence_hash=None, blocks=[block], tier="host"))
        return True

    def get(self, sequence_hash: int) -> torch.Tensor:
        """The block's contents (a view into the pool: copy it before the slot can be reused,
        or `pin` it for the copy's duration); the block turns most recent. A copy to the
        device may be queued on the engine's stream without waiting: that stream orders it
        before any later offload into the slot."""
        self.slots.move_to_end(sequence_hash)
        return self.data[self.slots[sequence_hash]]

    def contents(self, slot: int) -> torch.Tensor:
        """A slot's contents once they are there, for reading on the CPU."""
        copied = self.copied.pop(slot, None)
        if copied is not None:
            copied.synchronize()
        return self.data[slot]

    def pin(self, sequence_hash: int) -> None:
        if sequence_hash not in self.slots:
            raise KeyError(f"block {sequence_hash:#x} is not in the host tier")
        self.pins[sequence_hash] = self.pins.get(sequence_hash, 0) + 1

    def unpin(self, sequence_hash: int) -> None:
        left = self.pins[sequence_hash] - 1
        if left:
            self.pins[sequence_hash] = left
        else:
            del self.pins[sequence_hash]

    def snapshot(self) -> list[int]:
        return list(self.slots)

    def _free_slot(self) -> int | None:
        if self.free_slots:
            return self.free_slots.pop()
        victim = next((h for h in self.slots if h not in self.pins), None)
        if victim is None:
            return None
        slot = self.slots.pop(victim)
        local = self.local_hashes.pop(victim)
        if self.on_evict is not None:
            self.on_evict(victim, local, self.contents(slot))
        self.emit(KvRemoved(event_id=0, sequence_hashes=[victim], tier="host"))
        return slot
