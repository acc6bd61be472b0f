"""The disk tier: one checksummed file per KV block, under a folder named by the model and
cache geometry, bounded in bytes, found again by a restarted worker.

A file is written under a temporary name and renamed into place, so a crash leaves either
the whole block or a temporary file that the next start deletes. Writes run on a writer
thread (the engine's step loop only queues a copy of the block: on CUDA into pinned memory,
without waiting for it); until one lands, reads of that block are served from that copy.
Every read checks the header (magic, version, geometry fingerprint, the block's hash, the
size) and an XXH3 checksum of the contents; a file that fails is deleted and reported as
`CorruptBlock`: the caller recomputes the block, never uses it.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import msgspec
import torch
import xxhash

from tandem.kvbm.host import block_shape
from tandem.protocol import KvBlock, KvEvent, KvLayout, KvRemoved, KvStored

log = logging.getLogger(__name__)

MAGIC = b"TDKV"
VERSION = 1
#: magic, version, geometry fingerprint, sequence hash, local hash, payload bytes, checksum
HEADER = struct.Struct("<4sHxxQQQQQ")
SUFFIX = ".kv"
EVENT_BLOCKS = 4096
#: Block writes queued behind the writer thread, at most (~2 MiB each for an 8B model): past
#: that a block is not written (`DiskTier.shed`): the step loop never waits for the disk.
MAX_WRITES = 64


class _Write(NamedTuple):
    """A block queued for the writer: its copy, the event after which that copy holds it
    (a copy from a GPU; None from host memory), and the write's future."""

    staged: torch.Tensor
    ready: torch.cuda.Event | None
    future: Future


class CorruptBlock(OSError):
    """A block file that is torn, altered or not of this cache: deleted, to be recomputed."""


def fingerprint(model: str, layout: KvLayout) -> int:
    """The identity of what a block's bytes mean: the model and the cache geometry."""
    return xxhash.xxh3_64_intdigest(model.encode() + b"\0" + msgspec.json.encode(layout))


class DiskTier:
    """Blocks of `layout` in `root/<fingerprint>/`, at most `capacity_bytes` of them (LRU).

    `put` queues the file's write on a writer thread; `read` may run on an I/O thread
    (`KvTiers` does); the bookkeeping stays on the caller's (the engine's) thread."""

    tier = "disk"

    def __init__(
        self,
        root: str | Path,
        model: str,
        layout: KvLayout,
        capacity_bytes: int,
        emit: Callable[[KvEvent], None],
    ) -> None:
        self.layout = layout
        self.fingerprint = fingerprint(model, layout)
        self.folder = Path(root) / f"{self.fingerprint:016x}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.payload_bytes = layout.block_bytes
        self.capacity = capacity_bytes // (HEADER.size + self.payload_bytes)
        if self.capacity < 1:
            raise ValueError(f"a disk tier of {capacity_bytes} bytes holds no block")
        self.emit = emit
        self.files: OrderedDict[int, int] = OrderedDict()  # sequence hash -> local hash, LRU first
        # Writes queued or running, oldest first.
        self._writes: OrderedDict[int, _Write] = OrderedDict()
        self._writer = ThreadPoolExecutor(1, "kv-disk-write")
        self.shed = 0  # blocks not written: the writer was MAX_WRITES behind
        self._scan()

    def __contains__(self, sequence_hash: int) -> bool:
        return sequence_hash in self.files

    def __len__(self) -> int:
        return len(self.files)

    def path(self, sequence_hash: int) -> Path:
        return self.folder / f"{sequence_hash:016x}{SUFFIX}"

    def put(self, sequence_hash: int, local_hash: int, contents: torch.Tensor) -> None:
        """Take a block (one already here only turns most recent), evicting the least recent
        beyond the capacity; its file is written behind, on the writer thread. With
        MAX_WRITES queued, the block is shed instead (a cache may forget: it is recomputed
        if it is asked for again), logged the first time."""
        if sequence_hash in self.files:
            self.files.move_to_end(sequence_hash)
            return
        size = contents.numel() * contents.element_size()
        if size != self.payload_bytes:
            raise ValueError(f"a block of {size} bytes, not {self.payload_bytes}")
        self._settle()
        if len(self._writes) >= MAX_WRITES:
            if not self.shed:
                log.warning("disk tier: %d block writes behind: shedding blocks", MAX_WRITES)
            self.shed += 1
            return
        while len(self.files) >= self.capacity:
            self._drop(next(iter(self.files)))
        staged, ready = _stage(contents)
        write = self._writer.submit(self._write, sequence_hash, local_hash, staged, ready)
        self._writes[sequence_hash] = _Write(staged, ready, write)
        self.files[sequence_hash] = local_hash
        block = KvBlock(sequence_hash, local_hash)
        self.emit(KvStored(event_id=0, parent_sequence_hash=None, blocks=[block], tier="disk"))

    def flush(self) -> None:
        """Wait until every queued write is on disk (or has failed and been dropped)."""
        self._settle(wait_for=len(self._writes))

    def _write(
        self,
        sequence_hash: int,
        local_hash: int,
        staged: torch.Tensor,
        ready: torch.cuda.Event | None,
    ) -> None:
        """Writer thread: header and checksum, a temporary file, renamed into place."""
        payload = _payload(staged, ready)
        header = HEADER.pack(MAGIC, VERSION, self.fingerprint, sequence_hash, local_hash,
                             len(payload), xxhash.xxh3_64_intdigest(payload))  # fmt: skip
        final = self.path(sequence_hash)
        temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(header)
                f.write(payload)
            os.replace(temporary, final)
        except OSError:
            temporary.unlink(missing_ok=True)
            raise

    def _settle(self, wait_for: int = 0) -> None:
        """Book the writes that are done, oldest first, waiting for the first `wait_for` of
        them; a failed write drops its block (logged): it was never on disk."""
        while self._writes:
            sequence_hash, (_, _, write) = next(iter(self._writes.items()))
            if wait_for <= 0 and not write.done():
                return
            wait_for -= 1
            del self._writes[sequence_hash]
            if (exc := write.exception()) is not None:
                log.warning("disk tier: block %#x not written (%s): dropped", sequence_hash, exc)
                self._drop(sequence_hash)

    def get(self, sequence_hash: int) -> torch.Tensor:
        """The block's contents, checked; CorruptBlock (the file deleted) if they fail."""
        if sequence_hash not in self.files:
            raise KeyError(f"block {sequence_hash:#x} is not in the disk tier")
        try:
            contents = self.read(sequence_hash)
        except CorruptBlock:
            self.drop(sequence_hash)
            raise
        self.files.move_to_end(sequence_hash)
        return contents

    def read(self, sequence_hash: int) -> torch.Tensor:
        """`get` without its bookkeeping (the LRU order, dropping a bad file): safe on an I/O
        thread, with the caller doing the rest on the engine's."""
        queued = self._writes.get(sequence_hash)  # one lookup: atomic on another thread
        if queued is not None:
            payload = bytearray(_payload(queued.staged, queued.ready))
        else:
            try:
                data = self.path(sequence_hash).read_bytes()
                self._check(data, sequence_hash)
            except (OSError, CorruptBlock) as exc:
                raise CorruptBlock(f"disk block {sequence_hash:#x} dropped: {exc}") from exc
            payload = bytearray(memoryview(data)[HEADER.size :])
        flat = torch.frombuffer(payload, dtype=torch.uint8)
        return flat.view(getattr(torch, self.layout.dtype)).view(block_shape(self.layout))

    def drop(self, sequence_hash: int) -> None:
        if sequence_hash in self.files:
            self._drop(sequence_hash)

    def snapshot(self) -> list[int]:
        return list(self.files)

    def _check(self, data: bytes, sequence_hash: int) -> None:
        if len(data) != HEADER.size + self.payload_bytes:
            raise CorruptBlock(f"{len(data)} bytes, not {HEADER.size + self.payload_bytes}")
        magic, version, fp, seq, _, size, checksum = HEADER.unpack_from(data)
        if (magic, version, fp, seq, size) != (MAGIC, VERSION, self.fingerprint, sequence_hash,
                                               self.payload_bytes):  # fmt: skip
            raise CorruptBlock("its header is not this block's")
        if xxhash.xxh3_64_intdigest(memoryview(data)[HEADER.size :]) != checksum:
            raise CorruptBlock("its checksum does not match its contents")

    def _drop(self, sequence_hash: int) -> None:
        queued = self._writes.pop(sequence_hash, None)
        if queued is not None and not queued.future.cancel():
            queued.future.exception()  # running: let it land before the file is deleted
        self.files.pop(sequence_hash, None)
        self.path(sequence_hash).unlink(missing_ok=True)
        self.emit(KvRemoved(event_id=0, sequence_hashes=[sequence_hash], tier="disk"))

    def _scan(self) -> None:
        """Find the blocks a previous run left (oldest first) and publish them; delete its
        temporary files and files of the wrong size, and the oldest beyond the capacity."""
        found = []
        for entry in os.scandir(self.folder):
            path = Path(entry.path)
            if entry.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                continue
            stat = entry.stat()
            try:
                sequence_hash = int(entry.name.removesuffix(SUFFIX), 16)
                if not entry.name.endswith(SUFFIX) or stat.st_size != (
                    HEADER.size + self.payload_bytes
                ):
                    raise ValueError(entry.name)
                with open(path, "rb") as f:
                    local_hash = HEADER.unpack(f.read(HEADER.size))[4]
            except (ValueError, OSError, struct.error):
                log.warning("disk tier: dropping %s (not a whole block file)", path)
                path.unlink(missing_ok=True)
                continue
            found.append((stat.st_mtime_ns, sequence_hash, local_hash))
        for _, sequence_hash, local_hash in sorted(found):
            self.files[sequence_hash] = local_hash
        while len(self.files) > self.capacity:
            oldest = next(iter(self.files))
            self.files.pop(oldest)
            self.path(oldest).unlink(missing_ok=True)
        if self.files:  # published again: routers may send this worker their prefixes
            log.info("disk tier: %d blocks found in %s", len(self.files), self.folder)
            blocks = [KvBlock(h, local) for h, local in self.files.items()]
            for i in range(0, len(blocks), EVENT_BLOCKS):  # each event well under NATS's 1 MB
                self.emit(KvStored(event_id=0, parent_sequence_hash=None,
                                   blocks=blocks[i : i + EVENT_BLOCKS], tier="disk"))  # fmt: skip


def _stage(contents: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A copy of a block for the writer thread, which may read it any time later. From a GPU
    it lands in pinned memory on the engine's stream and the caller does not wait for it
    (a `.cpu()` there would wait for the step that is running)."""
    if not contents.is_cuda:
        return contents.detach().contiguous().clone(), None
    staged = torch.empty(contents.shape, dtype=contents.dtype, pin_memory=True)
    staged.copy_(contents, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return staged, ready


def _payload(staged: torch.Tensor, ready: torch.cuda.Event | None) -> memoryview:
    """A staged block's bytes, once its copy has landed."""
    if ready is not None:
        ready.synchronize()
    return memoryview(staged.reshape(-1).view(torch.uint8).numpy())
