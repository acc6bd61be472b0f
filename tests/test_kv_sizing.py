"""How much of a GPU the KV cache gets (`--gpu-memory-utilization`)."""

from __future__ import annotations

from tandem.engine.model_runner import kv_budget_bytes


def test_kv_budget_is_this_engines_share_capped_by_free_memory():
    gib = 2**30
    # Alone on a 100 GiB GPU: 90 GiB share, 20 GiB peak (16 weights + 4 activations).
    assert kv_budget_bytes(100 * gib, 84 * gib, 20 * gib, 16 * gib, 0.9) == 70 * gib
    # A second engine at 0.45 beside one holding 45 GiB: its own share, not less.
    assert kv_budget_bytes(100 * gib, 39 * gib, 20 * gib, 16 * gib, 0.45) == 25 * gib
    # Not enough free memory for the share: what is free beside the activations.
    assert kv_budget_bytes(100 * gib, 20 * gib, 20 * gib, 16 * gib, 0.9) == 16 * gib
    assert kv_budget_bytes(100 * gib, 2 * gib, 20 * gib, 16 * gib, 0.9) == 0
