import json
from pathlib import Path

import pytest

from tandem.protocol import block_hashes
from tandem.protocol.hashing import iter_sequence_hashes

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "spec" / "block_hash_vectors.json"


def load_cases():
    if not VECTORS.exists():
        pytest.fail(f"block hash vectors not found at {VECTORS} (shared/ must sit beside the repo)")
    return json.loads(VECTORS.read_text())["cases"]


@pytest.mark.parametrize("case", load_cases(), ids=lambda c: f"{len(c['tokens'])}tok")
def test_block_hash_vectors(case):
    local, seq = block_hashes(case["tokens"], case["block_size"], case.get("lora_name"))
    assert local == case["local_hashes"]
    assert seq == case["sequence_hashes"]
    lazy = iter_sequence_hashes(case["tokens"], case["block_size"], case.get("lora_name"))
    assert list(lazy) == case["sequence_hashes"]


def test_chain_continues_from_parent():
    tokens = list(range(100))
    _, whole = block_hashes(tokens, 16)
    _, tail = block_hashes(tokens[32:], 16, parent=whole[1])
    assert whole[2:] == tail
