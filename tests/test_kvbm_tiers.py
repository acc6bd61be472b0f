"""The host and disk KV tiers on their own: contents round-trip bit for bit, bounds hold,
events name the tier, corrupt and torn files are refused, a restart finds the disk tier."""

from __future__ import annotations

import os

import pytest
import torch

from tandem.kvbm import CorruptBlock, DiskTier, HostTier
from tandem.kvbm.disk import HEADER
from tandem.kvbm.host import block_shape
from tandem.protocol import KvLayout, KvRemoved, KvStored

LAYOUT = KvLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")


def block(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(block_shape(LAYOUT), generator=gen).to(torch.bfloat16)


class Events(list):
    def stored(self, tier: str) -> list[int]:
        return [b.sequence_hash for e in self if isinstance(e, KvStored) and e.tier == tier
                for b in e.blocks]  # fmt: skip

    def removed(self, tier: str) -> list[int]:
        return [h for e in self if isinstance(e, KvRemoved) and e.tier == tier
                for h in e.sequence_hashes]  # fmt: skip


def test_host_tier_round_trips_and_evicts_lru_into_the_next_tier() -> None:
    events, evicted = Events(), {}
    host = HostTier(LAYOUT, 3 * LAYOUT.block_bytes + 7, events.append,
                    on_evict=lambda h, local, data: evicted.update({h: (local, data.clone())}))
    assert host.capacity == 3 and host.data.numel() * 2 == 3 * LAYOUT.block_bytes
    for h in (1, 2, 3):
        assert host.put(h, 100 + h, block(h))
    assert torch.equal(host.get(1), block(1))  # bit for bit; 1 is now the most recent
    assert host.put(4, 104, block(4))
    assert 2 not in host and len(host) == 3 and set(host.snapshot()) == {1, 3, 4}
    assert evicted[2][0] == 102 and torch.equal(evicted[2][1], block(2))
    assert events.stored("host") == [1, 2, 3, 4] and events.removed("host") == [2]
    assert host.put(3, 103, block(99)) and torch.equal(host.get(3), block(3))  # already held


def test_a_block_being_loaded_is_never_evicted() -> None:
    host = HostTier(LAYOUT, 2 * LAYOUT.block_bytes, lambda e: None)
    host.put(1, 1, block(1))
    host.put(2, 2, block(2))
    host.pin(1)
    host.pin(2)
    assert not host.put(3, 3, block(3)) and set(host.snapshot()) == {1, 2}
    host.unpin(1)
    assert host.put(3, 3, block(3)) and 1 not in host and torch.equal(host.get(2), block(2))
    with pytest.raises(KeyError):
        host.pin(1)
    with pytest.raises(ValueError, match="holds no block"):
        HostTier(LAYOUT, LAYOUT.block_bytes - 1, lambda e: None)


def test_disk_tier_round_trips_bounds_and_survives_a_restart(tmp_path) -> None:
    events = Events()
    size = HEADER.size + LAYOUT.block_bytes
    disk = DiskTier(tmp_path, "model-a", LAYOUT, 3 * size, events.append)
    for h in (1, 2, 3, 4):
        disk.put(h, 10 + h, block(h))
        disk.flush()
        os.utime(disk.path(h), ns=(h * 10**9, h * 10**9))  # distinct ages for the restart
    assert set(disk.snapshot()) == {2, 3, 4} and not disk.path(1).exists()
    assert torch.equal(disk.get(3), block(3)) and disk.get(3).dtype == torch.bfloat16
    assert events.stored("disk") == [1, 2, 3, 4] and events.removed("disk") == [1]
    assert sorted(os.listdir(disk.folder)) == [disk.path(h).name for h in (2, 3, 4)]

    (disk.folder / ".0000000000000005.kv.123.tmp").write_bytes(b"half a block")
    again = Events()
    restarted = DiskTier(tmp_path, "model-a", LAYOUT, 3 * size, again.append)
    assert restarted.snapshot() == [2, 3, 4]  # oldest first
    assert again.stored("disk") == [2, 3, 4] and again[-1].blocks[0].local_hash == 12
    assert torch.equal(restarted.get(4), block(4))
    assert sorted(os.listdir(disk.folder)) == [disk.path(h).name for h in (2, 3, 4)]
    smaller = DiskTier(tmp_path, "model-a", LAYOUT, size, lambda e: None)
    assert smaller.snapshot() == [4]
    other = DiskTier(tmp_path, "model-b", LAYOUT, 3 * size, lambda e: None)
    assert len(other) == 0 and other.folder != disk.folder  # another model's blocks stay apart


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "swap"])
def test_corrupt_and_torn_disk_blocks_are_refused_and_dropped(tmp_path, damage: str) -> None:
    events = Events()
    disk = DiskTier(tmp_path, "m", LAYOUT, 10 * (HEADER.size + LAYOUT.block_bytes), events.append)
    disk.put(1, 11, block(1))
    disk.put(2, 12, block(2))
    disk.flush()
    path = disk.path(1)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-1] ^= 0x01
    elif damage == "truncate":
        data = data[:-10]
    elif damage == "header":
        data[0:4] = b"XXXX"
    else:  # another block's file under this block's name
        data = bytearray(disk.path(2).read_bytes())
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBlock):
        disk.get(1)
    assert 1 not in disk and not path.exists() and events.removed("disk") == [1]
    assert torch.equal(disk.get(2), block(2))
    if damage == "truncate":  # a restart drops a torn file before anyone asks for it
        disk.put(1, 11, block(1))
        disk.flush()
        disk.path(1).write_bytes(bytes(data))
        assert DiskTier(tmp_path, "m", LAYOUT, 10**6, lambda e: None).snapshot() == [2]


def test_disk_writes_run_behind_the_caller_and_a_failed_one_drops_its_block(tmp_path) -> None:
    """`put` returns while its file is still being written (the engine's step loop never
    waits for the disk) and keeps its own copy (the caller reuses its block at once); the
    block reads back from memory meanwhile; a write that fails leaves no block behind, and
    a removed event says so."""
    import threading

    events = Events()
    disk = DiskTier(tmp_path, "m", LAYOUT, 10 * (HEADER.size + LAYOUT.block_bytes), events.append)
    gate, write = threading.Event(), disk._write
    disk._write = lambda *args: (gate.wait(10), write(*args))
    source = block(1)
    disk.put(1, 11, source)
    source.zero_()  # the device slot taken by another block
    assert 1 in disk and not disk.path(1).exists()  # queued: the caller did not wait
    assert torch.equal(disk.get(1), block(1))
    gate.set()
    disk.flush()
    assert disk.path(1).exists() and torch.equal(disk.read(1), block(1))

    def fail(*args):
        raise OSError("disk full")

    disk._write = fail
    disk.put(2, 12, block(2))
    disk.flush()
    assert 2 not in disk and not disk.path(2).exists() and events.removed("disk") == [2]


def test_a_disk_that_falls_behind_sheds_blocks_instead_of_stalling(tmp_path, monkeypatch) -> None:
    """With MAX_WRITES queued behind a stuck writer, `put` returns at once and forgets the
    block (no file, no event): the step loop never waits for the disk. Once the writer
    catches up, blocks are taken again."""
    import threading

    from tandem.kvbm import disk as disk_module

    monkeypatch.setattr(disk_module, "MAX_WRITES", 2)
    events = Events()
    disk = DiskTier(tmp_path, "m", LAYOUT, 10 * (HEADER.size + LAYOUT.block_bytes), events.append)
    gate, write = threading.Event(), disk._write
    disk._write = lambda *args: (gate.wait(10), write(*args))
    for h in (1, 2, 3):
        disk.put(h, 10 + h, block(h))
    assert 3 not in disk and disk.shed == 1 and events.stored("disk") == [1, 2]
    gate.set()
    disk.flush()
    disk.put(3, 13, block(3))
    disk.flush()
    assert torch.equal(disk.read(3), block(3)) and events.stored("disk") == [1, 2, 3]


def test_tiers_load_only_while_loading_beats_recomputing(tmp_path) -> None:
    """Both rates are measured: the first disk load times the tier; once recomputing a block
    is known to be faster, a hit is left to recompute and no device block is taken."""
    from tandem.kvbm.tiers import KvTiers

    caches = tuple(torch.zeros(LAYOUT.num_layers, 4, 4, 2, 8, dtype=torch.bfloat16)
                   for _ in range(2))  # fmt: skip
    disk = DiskTier(tmp_path, "m", LAYOUT, 8 * LAYOUT.block_bytes, lambda e: None)
    recompute = [None]
    tiers = KvTiers(None, disk, caches, recompute_s=lambda: recompute[0])
    for h in (1, 2, 3):
        disk.put(h, h, block(h))
    taken = []

    def take() -> int:
        taken.append(len(taken))
        return taken[-1]

    assert tiers.onboard(1, take) == 0 and tiers.rates["disk"].value > 0
    assert torch.equal(torch.stack([caches[0][:, 0], caches[1][:, 0]]), block(1))
    recompute[0] = 10.0  # recomputing takes 10 s: loading still wins
    assert tiers.onboard(2, take) == 1
    recompute[0] = 1e-9
    assert tiers.onboard(3, take) is None and taken == [0, 1]
    assert tiers.skipped == {"host": 0, "disk": 1} and tiers.hits["disk"] == 2
