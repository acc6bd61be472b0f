"""Block manager: reference counts, prefix hits, LRU eviction and the KV events they produce."""

from tandem.engine.block_manager import BlockManager
from tandem.engine.sequence import Sequence
from tandem.protocol import KvCleared, KvRemoved, KvStored, SamplingParams, block_hashes

B = 4


def seq(tokens):
    return Sequence("r", 0, tokens, SamplingParams())


def compute(bm, s, n=None):
    """Pretend the model computed the sequence's tokens, as the engine does after a step."""
    n = s.num_tokens if n is None else n
    assert bm.allocate(s, n - s.num_computed_tokens)
    s.num_computed_tokens = n
    bm.commit(s)


def test_stored_events_carry_spec_hashes_and_parents():
    bm = BlockManager(8, B)
    tokens = list(range(10))
    s = seq(tokens)
    compute(bm, s)
    local, seqh = block_hashes(tokens, B)
    (event,) = bm.take_events()
    assert isinstance(event, KvStored) and event.event_id == 0
    assert event.parent_sequence_hash is None
    pairs = [(b.sequence_hash, b.local_hash) for b in event.blocks]
    assert pairs == list(zip(seqh, local, strict=True))
    # Growing into a third full block publishes just that block, chained to its parent.
    s.token_ids += [10, 11]
    compute(bm, s)
    (event,) = bm.take_events()
    _, seqh = block_hashes(s.token_ids, B)
    assert event.event_id == 1 and event.parent_sequence_hash == seqh[1]
    assert [b.sequence_hash for b in event.blocks] == [seqh[2]]


def test_prefix_hit_shares_blocks_and_counts_refs():
    bm = BlockManager(8, B)
    a = seq(list(range(9)))
    compute(bm, a)
    b = seq(list(range(8)) + [99, 98])
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:2]
    assert bm.allocate(b, b.num_tokens - 8, hits)
    assert b.num_computed_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert all(bm.blocks[i].ref_count == 2 for i in hits)
    bm.free_seq(a)
    assert all(bm.blocks[i].ref_count == 1 for i in hits)
    bm.free_seq(b)
    assert bm.num_active_blocks == 0 and bm.num_free_blocks == 8


def test_hit_leaves_last_token_to_compute():
    bm = BlockManager(8, B)
    a = seq(list(range(8)))
    compute(bm, a)
    bm.free_seq(a)
    same = seq(list(range(8)))
    # Both blocks are cached, but the last token's logits are needed: only one block hits.
    assert len(bm.match_prefix(same)) == 1


def test_lru_eviction_emits_removed_and_keeps_recent_blocks():
    bm = BlockManager(4, B)
    old = seq([1] * 8)
    compute(bm, old)
    bm.free_seq(old)
    recent = seq([2] * 8)
    compute(bm, recent)
    bm.free_seq(recent)
    bm.take_events()
    # Needing two fresh blocks evicts the least recently freed cached ones: `old`'s.
    new = seq([3] * 8)
    assert bm.allocate(new, 8)
    events = bm.take_events()
    _, old_hashes = block_hashes([1] * 8, B)
    assert len(events) == 1 and isinstance(events[0], KvRemoved)
    assert sorted(events[0].sequence_hashes) == sorted(old_hashes)
    assert len(bm.match_prefix(seq([2] * 9))) == 2


def test_allocate_fails_without_side_effects_when_full():
    bm = BlockManager(2, B)
    a = seq(list(range(8)))
    assert bm.allocate(a, 8)
    b = seq(list(range(100, 104)))
    assert not bm.allocate(b, 4)
    assert b.block_table == [] and bm.num_free_blocks == 0


def test_reset_prefix_cache_only_when_idle():
    bm = BlockManager(4, B)
    a = seq(list(range(8)))
    compute(bm, a)
    assert not bm.reset_prefix_cache()
    bm.free_seq(a)
    bm.take_events()
    assert bm.reset_prefix_cache()
    assert isinstance(bm.take_events()[0], KvCleared)
    assert bm.match_prefix(seq(list(range(9)))) == []


class DictTiers:
    """KvTiers' interface over a dict: block contents are the block ids they came from."""

    def __init__(self):
        self.blocks, self.writes = {}, []

    def __contains__(self, h):
        return h in self.blocks

    def offload(self, block_id, h, local):
        self.blocks[h] = block_id

    def onboard(self, h, take_block, wait=False):
        if h not in self.blocks:
            return None
        block_id = take_block()
        self.writes.append((block_id, self.blocks[h]))
        return block_id

    def snapshot(self):
        return {"host": list(self.blocks)}


def test_tiers_take_evicted_blocks_and_prefix_lookups_load_them_back():
    """A middle block evicted out of order: the lookup loads it from the tier and takes the
    device's own copy of the block after it, never a second cached copy."""
    bm = BlockManager(num_blocks=5, block_size=4)
    bm.tiers = tiers = DictTiers()
    a = seq(list(range(13)))  # 3 full blocks + 1 token
    compute(bm, a)
    table = list(a.block_table)
    bm.free_seq(a)
    bm.take_events()
    bm.free.move_to_end(table[1], last=False)  # the middle block is next to go
    other = seq([99] * 3)
    assert bm.allocate(other, 3)
    assert tiers.blocks == {a.block_hashes[1]: table[1]}
    again = seq(list(range(13)))
    hits = bm.match_prefix(again)
    assert len(hits) == 3 and hits[0] == table[0] and hits[2] == table[2]
    assert tiers.writes == [(hits[1], table[1])] and hits[1] != table[1]
    assert bm.cached == {h: b for h, b in zip(again.block_hashes, hits, strict=True)}
    stored = [e for e in bm.take_events() if isinstance(e, KvStored)]
    assert [(e.parent_sequence_hash, [b.sequence_hash for b in e.blocks]) for e in stored] == [
        (again.block_hashes[0], [again.block_hashes[1]])
    ]
    assert bm.allocate(again, 1, hits) and again.num_computed_tokens == 12
    assert bm.snapshot().blocks["host"] == [a.block_hashes[1]]


def test_no_onboarding_for_a_request_that_cannot_fit():
    """A prefix in the tiers is loaded only when the request's next chunk fits beside it:
    otherwise the loads would evict other cached blocks and repeat every step it waits."""
    bm = BlockManager(num_blocks=7, block_size=4)
    bm.tiers = tiers = DictTiers()
    a = seq(list(range(13)))  # 3 full blocks + 1 token
    compute(bm, a)
    bm.free_seq(a)
    other = seq([99] * 16)  # its 4 blocks push a's into the tier
    compute(bm, other)
    bm.free_seq(other)
    compute(bm, seq([77] * 12))  # holds 3 of the 7 blocks
    assert set(a.block_hashes[:3]) <= set(tiers.blocks) and len(bm.free) == 4
    cached_before = dict(bm.cached)
    longer = seq(list(range(13)) + [5] * 16)  # a's prefix and 4 blocks more: 8 in all
    assert bm.match_prefix(longer) == [] and tiers.writes == [] and bm.cached == cached_before
    # A chunk of 4 tokens after the 3 loaded blocks needs 4 blocks: the 4 free ones.
    assert len(bm.match_prefix(longer, max_new_tokens=4)) == 3 and len(tiers.writes) == 3
