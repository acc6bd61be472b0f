"""The KV index and the router's choices, without processes: events in, decisions out."""

from __future__ import annotations

import collections
import time

import pytest

from tandem.protocol import KvBlock, KvCleared, KvRemoved, KvStored, LoadStats
from tandem.protocol.hashing import block_hashes
from tandem.router import KvIndex, Router

B = 16


def hashes(tokens: list[int]) -> list[int]:
    return block_hashes(tokens, B)[1]


def stored(event_id: int, hs: list[int], tier: str = "device", parent: int | None = None):
    return KvStored(
        event_id=event_id,
        parent_sequence_hash=parent,
        blocks=[KvBlock(h, 0) for h in hs],
        tier=tier,
    )


def load(active: int = 0, queued: int = 0, total: int = 1000) -> LoadStats:
    return LoadStats(
        active_blocks=active,
        free_blocks=total - active,
        total_blocks=total,
        num_running=0,
        num_waiting=0,
        queued_prefill_tokens=queued,
    )


PROMPT = list(range(1000, 1000 + 8 * B))  # 8 full blocks
H = hashes(PROMPT)


# -- index -------------------------------------------------------------------------------


def test_overlap_counts_leading_blocks_only():
    index = KvIndex()
    assert index.apply("a", [stored(0, H[:5])])
    assert index.apply("b", [stored(0, H[:2] + H[3:])])  # misses block 2
    assert index.apply("c", [stored(0, H[1:])])  # misses block 0: no usable prefix
    overlap = index.overlap(H)
    assert overlap.blocks == {"a": 5, "b": 2}
    assert overlap.weighted == {"a": 5.0, "b": 2.0}


def test_removed_and_cleared():
    index = KvIndex()
    index.apply("a", [stored(0, H), KvRemoved(event_id=1, sequence_hashes=[H[4]])])
    assert index.overlap(H).blocks == {"a": 4}
    index.apply("a", [KvCleared(event_id=2)])
    assert index.overlap(H).blocks == {}
    assert index.num_blocks("a") == 0
    index.apply("a", [stored(3, H[:3])])
    assert index.overlap(H).blocks == {"a": 3}


def test_tiers_weigh_cached_blocks():
    index = KvIndex()
    index.apply("a", [stored(0, H[:4]), stored(1, H[4:8], tier="host")])
    index.apply("b", [stored(0, H[:8], tier="disk")])
    overlap = index.overlap(H)
    assert overlap.blocks == {"a": 8, "b": 8}
    assert overlap.weighted["a"] == pytest.approx(4 + 4 * 0.75)
    assert overlap.weighted["b"] == pytest.approx(8 * 0.25)
    assert overlap.lower == {"a": (4, 0), "b": (0, 8)}
    # Offloaded to host, then dropped from device: the host copy still counts.
    index.apply("a", [stored(2, H[:4], tier="host"), KvRemoved(event_id=3, sequence_hashes=H[:4])])
    assert index.overlap(H).weighted["a"] == pytest.approx(8 * 0.75)


def test_gap_needs_a_snapshot_then_later_events_apply():
    index = KvIndex()
    assert index.apply("a", [stored(0, H[:2])])
    assert not index.apply("a", [stored(2, H[2:4])])  # event 1 lost
    assert index.overlap(H).blocks == {"a": 2}  # nothing past the gap applied
    index.replace("a", last_event_id=2, blocks={"device": H[:4]})
    assert index.apply("a", [stored(2, H[2:4]), stored(3, H[4:6])])  # 2 is old news
    assert index.overlap(H).blocks == {"a": 6}


def test_late_join_is_a_gap():
    index = KvIndex()
    assert not index.apply("a", [stored(7, H[:2])])
    assert not index.in_sync("a")


def test_worker_loss_drops_its_blocks_and_its_bit_is_reused():
    index = KvIndex()
    index.apply("a", [stored(0, H)])
    index.apply("b", [stored(0, H[:3])])
    index.remove_worker("a")
    assert index.overlap(H).blocks == {"b": 3}
    assert index.num_blocks() == 3
    index.apply("c", [stored(0, H[:1])])  # takes a's bit: must not inherit a's blocks
    assert index.overlap(H).blocks == {"b": 3, "c": 1}


def test_memory_is_bounded_per_worker():
    index = KvIndex(max_blocks_per_worker=5)
    assert not index.apply("a", [stored(0, H)])
    assert index.num_blocks("a") == 0 and not index.in_sync("a")
    assert index.approx_bytes() == 0


def test_predictions_expire_after_their_ttl():
    index = KvIndex()
    index.predict("a", H[:4], ttl=10.0)
    assert index.overlap(H).blocks == {"a": 4}
    index.predict("a", H[:2], ttl=100.0)  # refreshed: survive the first expiry
    now = time.monotonic()
    assert index.expire(now + 20) == 2
    assert index.overlap(H).blocks == {"a": 2}
    index.expire(now + 200)
    assert index.overlap(H).blocks == {}


# -- selection ---------------------------------------------------------------------------


def test_kv_follows_the_cost():
    router = Router(B, "kv")
    for w in "abc":
        router.add_worker(w)
    router.apply_events("a", [stored(0, H[:6])])
    router.apply_events("b", [stored(0, H[:2])])
    router.update_load("a", load(active=0))
    # a: 8 - 6 = 2; b: 8 - 2 = 6; c: 8.
    assert router.select(PROMPT, ["a", "b", "c"]).worker_id == "a"
    scores = {s.worker_id: s.cost for s in router.scores(PROMPT, ["a", "b", "c"])}
    assert scores == {"a": 2.0, "b": 6.0, "c": 8.0}
    # Load outweighs the cache: a is 5 blocks busier than b's deficit.
    router.update_load("a", load(active=5))
    assert router.select(PROMPT, ["a", "b", "c"]).worker_id == "b"
    router.update_load("a", load(queued=4 * B))  # 4 blocks of queued prefill: 2 + 4 = 6 = b
    router.update_load("b", load(active=1))
    assert router.select(PROMPT, ["a", "b", "c"]).worker_id == "a"


def rated(prefill: float = 0.0, host: float = 0.0, disk: float = 0.0, **kw) -> LoadStats:
    stats = load(**kw)
    stats.prefill_tokens_per_s, stats.host_blocks_per_s, stats.disk_blocks_per_s = (
        prefill, host, disk)  # fmt: skip
    return stats


def tiered_router(cost: str) -> Router:
    """a: the prompt on device; b: on host; c: on disk; d: nothing."""
    router = Router(B, "kv", cost=cost)
    for w, tier in zip("abc", ("device", "host", "disk"), strict=False):
        router.add_worker(w)
        router.apply_events(w, [stored(0, H, tier=tier)])
    router.add_worker("d")
    return router


def test_seconds_cost_is_the_block_cost_at_one_blocks_prefill_time_until_rates_arrive():
    from tandem.router.router import DEFAULT_PREFILL_TOKENS_PER_S

    blocks, seconds = tiered_router("blocks"), tiered_router("seconds")
    for router in (blocks, seconds):
        router.update_load("a", load(active=3, queued=2 * B))
    by_blocks = {s.worker_id: s.cost for s in blocks.scores(PROMPT, list("abcd"))}
    by_seconds = {s.worker_id: s.cost for s in seconds.scores(PROMPT, list("abcd"))}
    block_s = B / DEFAULT_PREFILL_TOKENS_PER_S
    assert by_seconds == pytest.approx({w: c * block_s for w, c in by_blocks.items()})


def test_seconds_cost_uses_each_workers_published_rates():
    """Tokens per second set the price of prefill; a tier's load rate the price of its hits,
    never above recomputing them (the engine recomputes then)."""
    router = tiered_router("seconds")
    router.update_load("a", rated(prefill=8000.0, queued=32 * B))  # 32 blocks queued: 64 ms
    router.update_load("b", rated(prefill=8000.0, host=1000.0))  # 8 host loads: 8 ms
    router.update_load("c", rated(prefill=8000.0, disk=100.0))  # slower than 2 ms recompute
    router.update_load("d", rated(prefill=16000.0))  # twice as fast: 8 blocks in 8 ms
    cost = {s.worker_id: s.cost for s in router.scores(PROMPT, list("abcd"))}
    assert cost == pytest.approx({"a": 0.064, "b": 0.008, "c": 0.016, "d": 0.008})
    router.update_load("d", rated(prefill=12000.0))
    assert router.select(PROMPT, list("abcd")).worker_id == "b"
    # By blocks, the disk copy still earns a quarter of its credit and the fast d is unseen.
    by_blocks = tiered_router("blocks")
    cost = {s.worker_id: s.cost for s in by_blocks.scores(PROMPT, list("bcd"))}
    assert cost == pytest.approx({"b": 2.0, "c": 6.0, "d": 8.0})
    with pytest.raises(ValueError, match="router cost"):
        Router(B, "kv", cost="tokens")


def test_kv_skips_a_nearly_full_worker():
    router = Router(B, "kv")
    router.apply_events("a", [stored(0, H)])
    router.update_load("a", load(active=990, total=1000))
    router.update_load("b", load(active=0))
    router.update_load("a", load(active=990, total=1000))
    assert router.select(PROMPT, ["a", "b"]).worker_id == "b"
    assert router.select(PROMPT, ["a"]).worker_id == "a"  # nobody else: still served


def test_temperature_samples_by_cost():
    router = Router(B, "kv", temperature=0.5, seed=1)
    router.apply_events("a", [stored(0, H)])  # cost 0
    router.apply_events("b", [stored(0, H[:4])])  # cost 4
    picks = [router.select(PROMPT, ["a", "b", "c"]).worker_id for _ in range(600)]
    counts = collections.Counter(picks)
    # p ∝ exp(-(c - 0) / (8 * 0.5)): a 1, b e^-1, c e^-2.
    total = 1 + 0.3679 + 0.1353
    for worker, weight in (("a", 1), ("b", 0.3679), ("c", 0.1353)):
        assert counts[worker] / 600 == pytest.approx(weight / total, abs=0.06), counts
    cold = Router(B, "kv")
    cold.apply_events("a", [stored(0, H)])
    assert {cold.select(PROMPT, ["a", "b", "c"]).worker_id for _ in range(50)} == {"a"}


def test_bookings_count_until_first_token_and_finish():
    router = Router(B, "kv")
    tokens = list(range(10 * B))
    router.select(tokens, ["a"], request_id="r1")
    assert router.scores(tokens, ["a"])[0].prefill_blocks == 10
    assert router.scores(tokens, ["a"])[0].decode_blocks == 10
    router.first_token("r1")
    assert router.scores(tokens, ["a"])[0].prefill_blocks == 0
    assert router.scores(tokens, ["a"])[0].decode_blocks == 10
    router.finish("r1")
    assert router.scores(tokens, ["a"])[0].decode_blocks == 0
    router.finish("r1")  # idempotent
    assert router.scores(tokens, ["a"])[0].decode_blocks == 0


def test_published_load_minus_what_we_released_since():
    """A worker's figures lag: a request we saw finish no longer counts, even before the
    worker's next report says so."""
    router = Router(B, "kv")
    tokens = list(range(10 * B))
    router.select(tokens, ["a"], request_id="r1")
    router.update_load("a", load(active=13, queued=10 * B))  # r1 plus 3 blocks of others
    router.first_token("r1")
    assert router.scores(tokens, ["a"])[0].prefill_blocks == 0
    router.finish("r1")
    assert router.scores(tokens, ["a"])[0].decode_blocks == 3
    router.update_load("a", load(active=3))
    assert router.scores(tokens, ["a"])[0].decode_blocks == 3


def test_a_shared_system_prompt_spreads_over_all_workers():
    """One system prompt for everyone: the first worker to cache it must not take it all."""
    workers = [f"w{i}" for i in range(4)]
    router = Router(B, "kv")
    system = list(range(50_000, 50_000 + 32 * B))  # 512 tokens
    counts = collections.Counter()
    event_ids = collections.Counter()
    inflight: collections.deque[str] = collections.deque()
    for i in range(200):
        prompt = system + [i * 7 + j for j in range(4 * B)]
        rid = f"r{i}"
        choice = router.select(prompt, workers, request_id=rid).worker_id
        counts[choice] += 1
        # The worker computes the prompt's blocks and reports them.
        router.apply_events(choice, [stored(event_ids[choice], hashes(prompt))])
        event_ids[choice] += 1
        router.first_token(rid)
        inflight.append(rid)
        if len(inflight) > 16:  # 16 requests decoding at a time
            router.finish(inflight.popleft())
    fair = 200 / len(workers)
    assert min(counts[w] for w in workers) >= fair / 2, counts
    # And it still reuses: after the warm-up every worker holds the system prompt.
    assert router.hit_blocks >= 0.8 * 200 * 32


def test_replicas_fed_the_same_events_choose_alike():
    replicas = [Router(B, "kv"), Router(B, "kv")]
    workers = [f"w{i}" for i in range(8)]
    for r in replicas:
        for i, w in enumerate(workers):
            if i % 4:
                r.apply_events(w, [stored(0, H[: i % 4])])
            r.update_load(w, load(active=i % 3))
    prompts = [PROMPT[: (k % 8 + 1) * B] + [k] for k in range(40)]
    choices = [[r.select(p, workers).worker_id for p in prompts] for r in replicas]
    assert choices[0] == choices[1]
    assert len(set(choices[0])) > 1


def test_simple_policies():
    rr = Router(B, "round_robin")
    assert [rr.select(PROMPT, ["a", "b", "c"]).worker_id for _ in range(6)] == list("bcabca")
    least = Router(B, "least_loaded")
    least.update_load("a", load(active=5))
    least.update_load("b", load(active=1, queued=2 * B))
    least.update_load("c", load(active=4))
    assert least.select(PROMPT, ["a", "b", "c"]).worker_id == "b"
    rnd = Router(B, "random", seed=0)
    assert {rnd.select(PROMPT, ["a", "b", "c"]).worker_id for _ in range(60)} == {"a", "b", "c"}
    with pytest.raises(ValueError, match="unknown router policy"):
        Router(B, "nearest")


def test_approximate_mode_predicts_from_decisions():
    router = Router(B, "kv", approx_ttl=60.0)
    first = router.select(PROMPT, ["a", "b", "c"]).worker_id
    again = router.select(PROMPT, ["a", "b", "c"])
    assert again.worker_id == first and again.overlap_blocks == 8


def test_router_cost_flag_reaches_the_router():
    import argparse

    from tandem.cli.flags import add_router_flags, router_options

    parser = argparse.ArgumentParser()
    add_router_flags(parser)
    assert Router(B, "kv", **router_options(parser.parse_args([]))).cost == "blocks"
    args = parser.parse_args(["--router-cost", "seconds"])
    assert Router(B, "kv", **router_options(args)).cost == "seconds"
    with pytest.raises(SystemExit):
        parser.parse_args(["--router-cost", "tokens"])
