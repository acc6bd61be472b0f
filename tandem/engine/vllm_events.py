"""vLLM's KV-cache events as Tandem's (DESIGN.md): the same blocks under Tandem's hashes.

vLLM names a block by its own hash; its `BlockStored` events also carry the blocks' token ids,
so each block is re-hashed with Tandem's chain (`protocol.hashing.block_hashes`, continuing
from the parent's Tandem hash) and the KV router works on vLLM workers unchanged. The map
from vLLM's hashes to Tandem's lives as long as the blocks do: a `BlockRemoved` names vLLM
hashes only. Events arrive duck-typed (attributes of vLLM's msgspec structs), so this module
needs no vLLM to import or test.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any

from tandem.protocol import KvBlock, KvCleared, KvEvent, KvRemoved, KvSnapshot, KvStored
from tandem.protocol.hashing import block_hashes

log = logging.getLogger(__name__)

#: vLLM's storage media, as Tandem's tiers.
TIERS = {None: "device", "GPU": "device", "CPU": "host", "STORAGE": "disk"}


class VllmEventTranslator:
    """Turns vLLM event batches into numbered Tandem events and keeps what a snapshot needs."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.hashes: dict[tuple[Hashable, str], int] = {}  # (vLLM hash, tier) -> Tandem's
        self.last_event_id = -1
        self.skipped = 0  # stored events whose parent was never seen: not chainable

    def translate(self, events: list[Any]) -> list[KvEvent]:
        out: list[KvEvent] = []
        for event in events:
            kind = type(event).__name__
            if kind == "BlockStored":
                stored = self._stored(event)
                if stored is not None:
                    out.append(stored)
            elif kind == "BlockRemoved":
                removed = self._removed(event)
                if removed is not None:
                    out.append(removed)
            elif kind == "AllBlocksCleared":
                self.hashes.clear()
                out.append(KvCleared(event_id=self._next_id()))
        return out

    def snapshot(self) -> KvSnapshot:
        blocks: dict[str, list[int]] = {}
        for (_, tier), seq in self.hashes.items():
            blocks.setdefault(tier, []).append(seq)
        return KvSnapshot(last_event_id=self.last_event_id, blocks=blocks)

    def _stored(self, event: Any) -> KvStored | None:
        parent = None
        if event.parent_block_hash is not None:
            parent = next((self.hashes[key] for key in
                           ((event.parent_block_hash, t) for t in ("device", "host", "disk"))
                           if key in self.hashes), None)  # fmt: skip
            if parent is None:  # its parent left before we heard of it: cannot be chained
                self.skipped += 1
                if self.skipped == 1:
                    log.warning("vLLM KV event with an unknown parent block: skipped")
                return None
        size = event.block_size or self.block_size
        if len(event.token_ids) != size * len(event.block_hashes):
            raise ValueError(
                f"a vLLM BlockStored event has {len(event.token_ids)} token ids for"
                f" {len(event.block_hashes)} blocks of {size}"
            )
        locals_, seqs = block_hashes(event.token_ids, size, event.lora_name, parent=parent)
        tier = TIERS.get(event.medium, "device")
        for vllm_hash, seq in zip(event.block_hashes, seqs, strict=True):
            self.hashes[vllm_hash, tier] = seq
        blocks = [KvBlock(s, lo) for s, lo in zip(seqs, locals_, strict=True)]
        return KvStored(
            event_id=self._next_id(), parent_sequence_hash=parent, blocks=blocks, tier=tier
        )

    def _removed(self, event: Any) -> KvRemoved | None:
        tier = TIERS.get(event.medium, "device")
        gone = [self.hashes.pop((h, tier)) for h in event.block_hashes if (h, tier) in self.hashes]
        if not gone:
            return None
        return KvRemoved(event_id=self._next_id(), sequence_hashes=gone, tier=tier)

    def _next_id(self) -> int:
        self.last_event_id += 1
        return self.last_event_id
