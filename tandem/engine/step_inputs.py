"""One engine step's inputs as flat int32 arrays, built on the host and moved in one copy.

Every backend reads the same description of a step: the tokens, their positions and KV
slots, and per sequence where its queries start, how long its context is and which blocks
hold it. On a GPU the arrays are packed into one pinned buffer and copied with a single
non-blocking transfer; the device tensors are views into one device buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tandem.engine.scheduler import ScheduledBatch
from tandem.engine.sequence import PENDING, Sequence


@dataclass
class StepInputs:
    input_ids: np.ndarray  # [T] int32
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T] KV slot of each new token; -1: write nothing (padding)
    query_start_loc: np.ndarray  # [B + 1] rows of sequence i are [qsl[i], qsl[i + 1])
    seq_lens: np.ndarray  # [B] context length after this step (cached + new tokens)
    block_tables: np.ndarray  # [B, W] each sequence's blocks, padded with 0
    sample_rows: list[int]  # rows whose logits are sampled
    sample_seqs: list[Sequence]
    max_query_len: int
    max_seq_len: int
    num_decodes: int  # the first sequences compute one token each
    # Overlapped steps: decode rows whose input token the previous step is still sampling,
    # and where it lies in that step's sampled ids (filled in on the device).
    pending_rows: list[int]
    pending_src: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


@dataclass
class DeviceStep:
    """The same step on the model's device (int32 tensors, views of one buffer)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    sample_rows: torch.Tensor
    pending_rows: torch.Tensor
    pending_src: torch.Tensor


def build_step(batch: ScheduledBatch, block_size: int) -> StepInputs:
    """Flatten a scheduled batch, decodes (one token) first so that attention can give them
    tiles of their own. Decodes are built with list comprehensions: at a few hundred
    sequences a step, per-sequence numpy calls or appends would dominate the host's time."""
    decodes = [s for s, n in zip(batch.seqs, batch.num_tokens, strict=True) if n == 1]
    starts = [s.num_computed_tokens for s in decodes]
    b = block_size
    ids = [s.token_ids[p] for s, p in zip(decodes, starts, strict=True)]
    positions = list(starts)
    slots = [s.block_table[p // b] * b + p % b for s, p in zip(decodes, starts, strict=True)]
    seq_lens = [p + 1 for p in starts]
    qsl = list(range(len(decodes) + 1))
    tables = [
        s.block_table if len(s.block_table) == p // b + 1 else s.block_table[: p // b + 1]
        for s, p in zip(decodes, starts, strict=True)
    ]
    sample_rows = [
        i for i, (s, p) in enumerate(zip(decodes, starts, strict=True)) if p + 1 == s.num_tokens
    ]
    sample_seqs = [decodes[i] for i in sample_rows]
    pending_rows = [i for i, t in enumerate(ids) if t == PENDING]
    pending_src = [decodes[i].pending_index for i in pending_rows]
    max_q = 0
    for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
        if n == 1:
            continue
        start = seq.num_computed_tokens
        table = seq.block_table
        row = len(ids)
        ids += seq.token_ids[start : start + n]
        pos = np.arange(start, start + n, dtype=np.int64)
        positions += pos.tolist()
        blocks = np.asarray(table, dtype=np.int64)[pos // b]
        slots += (blocks * b + pos % b).tolist()
        max_q = max(max_q, n)
        context = start + n
        qsl.append(row + n)
        seq_lens.append(context)
        tables.append(table[: -(-context // b)])
        if context == seq.num_tokens:
            sample_rows.append(row + n - 1)
            sample_seqs.append(seq)
    num_decodes = len(decodes)
    width = max(map(len, tables), default=0)
    padded = [t + [0] * (width - len(t)) if len(t) < width else t for t in tables]
    return StepInputs(
        input_ids=np.asarray(ids, dtype=np.int32),
        positions=np.asarray(positions, dtype=np.int32),
        slot_mapping=np.asarray(slots, dtype=np.int32),
        query_start_loc=np.asarray(qsl, dtype=np.int32),
        seq_lens=np.asarray(seq_lens, dtype=np.int32),
        block_tables=np.array(padded, dtype=np.int32).reshape(len(tables), width),
        sample_rows=sample_rows,
        sample_seqs=sample_seqs,
        max_query_len=max(max_q, 1) if seq_lens else 0,
        max_seq_len=max(seq_lens, default=0),
        num_decodes=num_decodes,
        pending_rows=pending_rows,
        pending_src=pending_src,
    )


#: int32 elements per 16 bytes.
ALIGN = 4


class StepUploader:
    """Packs a step into a pinned host buffer and copies it to the device in one go.

    Two buffers take turns, each refilled only once the copy out of it has run (an event),
    so a step can be packed while the previous one is still queued on the GPU. On a CPU the
    packed buffer is used in place.
    """

    def __init__(self, device: torch.device, capacity: int = 1 << 16) -> None:
        self.device = device
        self._turn = 0
        self._host: list[torch.Tensor] = []
        self._copied: list[torch.cuda.Event | None] = []
        self._dev: list[torch.Tensor] = []
        if device.type == "cuda":
            self._grow(capacity)

    def _grow(self, size: int) -> None:
        for event in self._copied:
            if event is not None:
                event.synchronize()
        self._host = [torch.empty(size, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self._dev = [torch.empty(size, dtype=torch.int32, device=self.device) for _ in range(2)]
        self._copied = [None, None]

    def upload(self, step: StepInputs) -> DeviceStep:
        parts = [
            step.input_ids,
            step.positions,
            step.slot_mapping,
            step.query_start_loc,
            step.seq_lens,
            step.block_tables.reshape(-1),
            np.asarray(step.sample_rows, dtype=np.int32),
            np.asarray(step.pending_rows, dtype=np.int32),
            np.asarray(step.pending_src, dtype=np.int32),
        ]
        sizes = [len(p) for p in parts]
        # Each array starts on a 16-byte boundary: Triton specialises its kernels on pointer
        # alignment, and packed views at varying offsets would each compile a new variant.
        starts = np.cumsum([0] + [-(-n // ALIGN) * ALIGN for n in sizes])
        total = int(starts[-1])
        if self.device.type != "cuda":
            host = np.zeros(total, dtype=np.int32)
            _pack(host, parts, starts)
            flat = torch.from_numpy(host)
        else:
            if total > self._host[0].numel():
                self._grow(max(total, 2 * self._host[0].numel()))
            turn = self._turn = 1 - self._turn
            if self._copied[turn] is not None:
                self._copied[turn].synchronize()
            _pack(self._host[turn].numpy(), parts, starts)
            flat = self._dev[turn][:total]
            flat.copy_(self._host[turn][:total], non_blocking=True)
            self._copied[turn] = torch.cuda.Event()
            self._copied[turn].record()
        views = [flat[a : a + n] for a, n in zip(starts[:-1].tolist(), sizes, strict=True)]
        views[5] = views[5].view(step.block_tables.shape)
        return DeviceStep(*views)


def _pack(out: np.ndarray, parts: list[np.ndarray], starts: np.ndarray) -> None:
    for part, start in zip(parts, starts.tolist(), strict=False):
        out[start : start + len(part)] = part
