"""The real tiny engine with host and disk KV tiers under a device pool too small for its
prompts: evicted prefixes come back from the tiers and greedy outputs do not change."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.protocol import GenerateRequest, KvStored, SamplingParams

MIB = 1 / 1024  # GiB
PROMPT = [5 + (7 * i) % 300 for i in range(100)]  # 6 full blocks of 16, then 4 tokens


NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host tier: a GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_GPU)]


def engine(model, device: str = "cpu", **tiers) -> EngineCore:
    """With tiers that always load: the tiny model recomputes a block about as fast as a
    tier loads it, so the load-or-recompute rule (tested in test_kvbm_tiers.py) would make
    these runs depend on timing."""
    eng = EngineCore(EngineConfig(model=str(model), num_gpu_blocks=16, device=device, **tiers))
    if eng.block_manager.tiers is not None:
        eng.block_manager.tiers.recompute_s = lambda: None
    return eng


def run(eng: EngineCore, rid: str, prompt: list[int]) -> list[int]:
    sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    eng.add_request(GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling))
    tokens = []
    while eng.has_work():
        for out in eng.step():
            tokens += out.token_ids
    return tokens


def evict_then_rerun(eng: EngineCore) -> tuple[list[int], list[int], int]:
    """PROMPT, four other prompts that evict its blocks, PROMPT again: both outputs and the
    prompt tokens the second run found cached."""
    first = run(eng, "a", PROMPT)
    for i in range(4):
        run(eng, f"o{i}", [350 + i] + PROMPT[1:])
    hits_before = eng.block_manager.prefix_hits
    second = run(eng, "b", PROMPT)
    return first, second, eng.block_manager.prefix_hits - hits_before


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiers", ["host", "disk", "host+disk"])
def test_evicted_prefixes_come_back_from_the_tiers_with_the_same_outputs(
    tiny_llama, tmp_path, tiers: str, device: str
) -> None:
    baseline = evict_then_rerun(engine(tiny_llama, device))
    assert baseline[2] == 0, "without tiers the device pool has forgotten the prompt"
    flags = {}
    if "host" in tiers:  # host+disk: a host tier of 2 blocks, so most blocks go on to disk
        flags["kv_offloading_size"] = MIB if tiers == "host" else 2 * 8192 / 2**30
    if "disk" in tiers:
        flags |= {"kv_disk_path": str(tmp_path), "kv_disk_size": MIB}
    eng = engine(tiny_llama, device, **flags)
    first, second, cached = evict_then_rerun(eng)
    assert first == second == baseline[0] == baseline[1]
    assert cached == 6 * 16
    hits = eng.block_manager.tiers.hits
    if tiers == "host+disk":  # the later prompts' blocks pushed the prompt's on to disk
        assert sum(hits.values()) == 6 and hits["disk"] > 0
    else:
        assert hits == {"host": 0, "disk": 0} | {tiers: 6}
    stored = {e.tier for e in eng.block_manager.take_events() if isinstance(e, KvStored)}
    assert stored == {"device", *tiers.split("+")}
    snapshot = eng.block_manager.snapshot()
    assert set(snapshot.blocks) == {"device", *tiers.split("+")}
    stats = eng.stats()
    assert (stats.kv_host_hits, stats.kv_disk_hits) == (hits["host"], hits["disk"])
    exported = _scrape(eng)
    assert exported[("tandem_kv_tier_hits_total", "host")] == hits["host"]
    assert exported[("tandem_kv_tier_hits_total", "disk")] == hits["disk"]


def test_a_corrupt_disk_block_is_recomputed_and_a_restart_finds_the_disk_tier(
    tiny_llama, tmp_path
) -> None:
    flags = {"kv_disk_path": str(tmp_path), "kv_disk_size": MIB}
    eng = engine(tiny_llama, **flags)
    want = run(eng, "a", PROMPT)
    for i in range(4):
        run(eng, f"o{i}", [350 + i] + PROMPT[1:])
    on_disk = set(eng.block_manager.snapshot().blocks["disk"])
    del eng

    restarted = engine(tiny_llama, **flags)
    published = {b.sequence_hash for e in restarted.block_manager.take_events()
                 if isinstance(e, KvStored) and e.tier == "disk" for b in e.blocks}  # fmt: skip
    assert published == on_disk == set(restarted.block_manager.snapshot().blocks["disk"])
    seq = _seq(PROMPT)
    restarted.block_manager.update_hashes(seq, 6)
    assert set(seq.block_hashes) <= on_disk
    # Damage the prompt's third block: two load, the third is refused, the rest recomputed.
    path = restarted.block_manager.tiers.disk.path(seq.block_hashes[2])
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    before = restarted.block_manager.prefix_hits
    assert run(restarted, "b", PROMPT) == want
    assert restarted.block_manager.prefix_hits - before == 2 * 16
    assert restarted.block_manager.tiers.failed_loads == 1 and not path.exists()
    assert _scrape(restarted)[("tandem_kv_tier_load_failures_total", "")] == 1


def _scrape(eng: EngineCore) -> dict[tuple[str, str], float]:
    """The engine's Prometheus samples, by (name, tier label)."""
    from prometheus_client import CollectorRegistry

    from tandem.frontend.metrics import EngineStatsCollector

    registry = CollectorRegistry()
    registry.register(EngineStatsCollector(eng.stats))
    return {(sample.name, sample.labels.get("tier", "")): sample.value
            for family in registry.collect() for sample in family.samples}  # fmt: skip


def _seq(prompt: list[int]):
    from tandem.engine.sequence import Sequence

    return Sequence("probe", 0, prompt, SamplingParams())


def test_a_prefix_read_from_disk_waits_while_the_others_step(tiny_llama, tmp_path) -> None:
    """The request whose prefix is on disk is not scheduled until its reads (on the I/O
    thread) are done; a running request gets its tokens meanwhile; then the whole prefix is
    loaded and the output is the same as without tiers."""
    baseline = evict_then_rerun(engine(tiny_llama))
    eng = engine(tiny_llama, kv_disk_path=str(tmp_path), kv_disk_size=MIB)
    run(eng, "a", PROMPT)
    for i in range(4):
        run(eng, f"o{i}", [350 + i] + PROMPT[1:])
    sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    eng.add_request(GenerateRequest(request_id="runner", prompt_token_ids=[7, 8, 9],
                                    sampling=SamplingParams(max_tokens=30, ignore_eos=True)))
    eng.step()  # the runner is running
    eng.add_request(GenerateRequest(request_id="b", prompt_token_ids=PROMPT, sampling=sampling))
    outputs = eng.step()
    assert [o.request_id for o in outputs] == ["runner"]
    assert not eng.requests["b"][0].block_table, "b waits for its disk reads"
    tokens = []
    while eng.has_work():
        tokens += [t for o in eng.step() if o.request_id == "b" for t in o.token_ids]
    assert tokens == baseline[1]
    assert eng.block_manager.tiers.hits["disk"] == 6 and eng.block_manager.tiers._reads == {}


@pytest.mark.parametrize("tiers", ["host", "disk"])
def test_the_mock_engine_models_its_tiers(tiny_llama, tmp_path, tiers: str) -> None:
    """Same calls and events as the real tiers, no data: an evicted prompt comes back from
    the modelled tier, its loads take the modelled copy time inside the next step, and the
    worker publishes the tier's rate and its own prefill rate."""
    flags = {"kv_offloading_size": MIB} if tiers == "host" else {
        "kv_disk_path": str(tmp_path), "kv_disk_size": MIB}  # fmt: skip
    eng = engine(tiny_llama, engine="mock", mock_speedup=1000, **flags)
    bm = eng.block_manager
    assert eng.runner.tiers is bm.tiers
    load_times, take = [], bm.tiers.take_load_s
    bm.tiers.take_load_s = lambda: load_times.append(take()) or load_times[-1]
    first, second, cached = evict_then_rerun(eng)
    assert first == second and cached == 6 * 16
    assert bm.tiers.hits == {"host": 0, "disk": 0} | {tiers: 6}
    gbps = eng.config.mock_host_gbps if tiers == "host" else eng.config.mock_disk_gbps
    per_block = eng.kv_layout.block_bytes / (gbps * 1e9) / eng.config.mock_speedup
    assert sum(load_times) == pytest.approx(6 * per_block) and max(load_times) == sum(load_times)
    stored = {e.tier for e in bm.take_events() if isinstance(e, KvStored)}
    assert stored == {"device", tiers} and set(bm.snapshot().blocks) == {"device", tiers}
    stats = eng.stats()
    assert getattr(stats, f"{tiers}_blocks_per_s") == pytest.approx(1 / per_block)
    assert stats.prefill_tokens_per_s > 0


def test_tier_flags_are_checked(tiny_llama, tmp_path) -> None:
    with pytest.raises(ValueError, match="go together"):
        engine(tiny_llama, kv_disk_path=str(tmp_path))
    with pytest.raises(ValueError, match="prefix caching"):
        engine(tiny_llama, kv_offloading_size=MIB, enable_prefix_caching=False)


def test_tier_events_reach_a_router_index_over_real_nats(tiny_llama) -> None:
    """After its device pool evicted the prompt, the worker is known to hold it in host
    memory: the router credits its blocks at the host tier's weight."""
    import asyncio

    from nats_support import require_nats

    from tandem.deploy.processes import NatsServer
    from tandem.protocol.worker import KvEventBatch, kv_events_subject
    from tandem.router.index import TIER_WEIGHTS, KvIndex
    from tandem.runtime.nats_event_plane import NatsEventPlane

    eng = engine(tiny_llama, kv_offloading_size=MIB)
    run(eng, "a", PROMPT)
    for i in range(4):
        run(eng, f"o{i}", [350 + i] + PROMPT[1:])
    seq = _seq(PROMPT)
    eng.block_manager.update_hashes(seq, 6)
    assert not any(h in eng.block_manager.cached for h in seq.block_hashes)
    batch = KvEventBatch(worker_id="w1", events=eng.block_manager.take_events())

    async def main(url: str) -> KvEventBatch:
        publisher, subscriber = await NatsEventPlane.connect(url), await NatsEventPlane.connect(url)
        sub = await subscriber.subscribe(kv_events_subject("t", "*"), KvEventBatch)
        await asyncio.sleep(0.05)  # the SUB reaches the server first
        await publisher.publish(kv_events_subject("t", "w1"), batch)
        got = await asyncio.wait_for(sub.__anext__(), 5)
        await publisher.close()
        await subscriber.close()
        return got

    require_nats()
    with NatsServer() as server:
        received = asyncio.run(main(server.url))
    index = KvIndex()
    assert index.apply("w1", received.events)
    overlap = index.overlap(seq.block_hashes)
    assert overlap.blocks == {"w1": 6}
    assert overlap.weighted["w1"] == pytest.approx(6 * TIER_WEIGHTS["host"])
