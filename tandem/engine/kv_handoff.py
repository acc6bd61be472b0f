"""The engine's side of disaggregated serving: prefilled KV held for a decode worker to pull
(exports), and KV pulled in from a prefill worker (imports).

Owned by `EngineCore` and touched only from its thread, like the block manager and the
scheduler it works through. Prefill role: an exported request's blocks stay allocated until
the decode side confirms (`release_export`) or the hold expires. Decode role: an importing
request waits outside the scheduler until its blocks are reserved and filled, then joins
the batch as if it had computed its prompt here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from tandem.engine.block_manager import BlockManager
from tandem.engine.scheduler import Scheduler
from tandem.engine.sequence import FINISHED, Sequence
from tandem.protocol import KvLayout, KvTransferParams


class KvPayload(Protocol):
    """Pulled KV blocks, ready to be copied into this engine's cache (in the engine thread)."""

    def write_into(self, k_cache: Any, v_cache: Any, dst_block_ids: list[int]) -> None: ...


class KvSource(Protocol):
    """Where an imported request's KV comes from; `tandem.transfer` implements it."""

    async def fetch(
        self, params: KvTransferParams, indices: list[int], dst: list[int]
    ) -> KvPayload | None:
        """The blocks at `indices` of `params.block_ids`, bound for this engine's blocks
        `dst` (reserved, so a source may write them in place; None: nothing left to copy)."""

    async def release(self, params: KvTransferParams) -> None:
        """Tell the source it may free the blocks (idempotent)."""


class KvHandoff:
    def __init__(
        self,
        block_manager: BlockManager,
        scheduler: Scheduler,
        layout: KvLayout,
        export_ttl: float,
        caches: Callable[[], tuple[torch.Tensor, torch.Tensor] | None],
        transfer_ms: Callable[[int], float] | None = None,
    ) -> None:
        """`caches()`: the K and V caches to write imports into (None: the mock holds no
        KV data); `transfer_ms(bytes)`: the mock's modelled transfer time."""
        self.block_manager = block_manager
        self.scheduler = scheduler
        self.layout = layout
        self.export_ttl = export_ttl
        self._caches = caches
        self._transfer_ms = transfer_ms
        self.exporting: set[str] = set()  # requests that export once prefilled
        self.exports: dict[str, tuple[Sequence, float]] = {}  # held, with their deadline
        self.importing: dict[str, Sequence] = {}
        self.exports_expired = 0
        self.imports = 0
        self.import_fallbacks = 0

    # -- prefill role ----------------------------------------------------------------------

    def export(self, seq: Sequence) -> KvTransferParams:
        """Hold a prefilled sequence's blocks until `release_export` or the deadline."""
        self.exports[seq.request_id] = (seq, time.monotonic() + self.export_ttl)
        return KvTransferParams(
            request_id=seq.request_id,
            block_ids=list(seq.block_table),
            num_tokens=seq.num_computed_tokens,
            layout=self.layout,
            token_ids=seq.output_ids,
            rng_state=None,  # unused: seeded noise follows from the tokens (sampling_noise)
            expires_in=self.export_ttl,
        )

    def release_export(self, request_id: str) -> int:
        """Free an exported request's blocks (the decode side has them); how many were held."""
        entry = self.exports.pop(request_id, None)
        if entry is None:
            return 0
        seq = entry[0]
        held = len(seq.block_table)
        self.block_manager.free_seq(seq)
        return held

    def touch_export(self, request_id: str) -> list[int]:
        """An exported request's blocks, its deadline pushed back by a full hold (a transfer
        is starting). KeyError once released or expired: nobody may read them then."""
        entry = self.exports.get(request_id)
        if entry is None:
            raise KeyError(f"request {request_id!r} holds no exported KV (released or expired)")
        seq, deadline = entry
        self.exports[request_id] = (seq, max(deadline, time.monotonic() + self.export_ttl))
        return list(seq.block_table)

    def expire_exports(self, now: float | None = None) -> list[str]:
        """Free the exports whose deadline passed: their decode worker never confirmed."""
        now = time.monotonic() if now is None else now
        expired = [rid for rid, (_, deadline) in self.exports.items() if deadline <= now]
        for rid in expired:
            self.release_export(rid)
        self.exports_expired += len(expired)
        return expired

    def next_export_deadline(self) -> float | None:
        return min((d for _, d in self.exports.values()), default=None)

    # -- decode role -----------------------------------------------------------------------

    def modelled_transfer_s(self, num_blocks: int) -> float:
        """The mock engine's modelled time to move `num_blocks` blocks; 0 for the real one."""
        if self._transfer_ms is None:
            return 0.0
        return self._transfer_ms(num_blocks * self.layout.block_bytes) / 1000.0

    def prepare_import(self, seq: Sequence, params: KvTransferParams) -> None:
        """Continue from the sampled tokens; seeded noise continues with them, as its position
        is the number of output tokens (`params.rng_state` is ignored)."""
        seq.token_ids += params.token_ids
        self.importing[seq.request_id] = seq

    def reserve_import(self, request_id: str) -> tuple[list[int], list[int]] | None:
        """Allocate the blocks an imported prompt's KV goes into, reusing what this engine's
        prefix cache already holds. Returns which of the source's blocks to pull (indices
        into `block_ids`) and the local blocks they go to; None while no room is free."""
        seq = self.importing.get(request_id)
        if seq is None:
            raise KeyError(f"request {request_id!r} is not importing")
        if seq.block_table:
            raise RuntimeError(f"request {request_id!r} already has its blocks")
        prompt, block_size = seq.num_prompt_tokens, self.layout.block_size
        hits = self.block_manager.match_prefix(seq)[: prompt // block_size]
        if not self.block_manager.allocate(seq, prompt - len(hits) * block_size, hits):
            return None
        return list(range(len(hits), len(seq.block_table))), seq.block_table[len(hits) :]

    def finish_import(self, request_id: str, payload: Any, dst: list[int]) -> None:
        """The pulled blocks are in; `payload.write_into(k, v, dst)` copies them into the
        cache. The sequence then joins the batch as if it had computed its prompt here."""
        seq = self.importing[request_id]
        caches = self._caches()
        if payload is not None and caches is not None:
            payload.write_into(caches[0], caches[1], dst)
        del self.importing[request_id]
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.block_manager.commit(seq)
        self.scheduler.add(seq)
        self.imports += 1

    def fallback_import(self, request_id: str) -> None:
        """The transfer failed: compute the prompt here instead (same tokens, same seed)."""
        seq = self.importing.pop(request_id, None)
        if seq is None:
            return
        self.block_manager.free_seq(seq)
        self.scheduler.add(seq)
        self.import_fallbacks += 1

    def abort_import(self, request_id: str) -> Sequence | None:
        """Drop a request still waiting for its KV; its sequence, finished, if it was."""
        seq = self.importing.pop(request_id, None)
        if seq is not None:
            self.block_manager.free_seq(seq)
            seq.status = FINISHED
        return seq
