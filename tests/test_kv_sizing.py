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


def test_the_profiling_step_keeps_every_position_inside_max_model_len():
    """8192 budget tokens with a 1152-token RoPE table: sequences of at most 1152 tokens with
    disjoint blocks (one 8192-token sequence read RoPE rows past the table on a GPU)."""
    from tandem.engine.model_runner import profile_batch
    from tandem.engine.step_inputs import build_step

    batch = profile_batch(8192, 1152, 16)
    assert sum(batch.num_tokens) == 8192 and max(batch.num_tokens) == 1152
    tables = [b for s in batch.seqs for b in s.block_table]
    assert len(tables) == len(set(tables)) == sum(-(-n // 16) for n in batch.num_tokens)
    step = build_step(batch, 16)
    assert max(step.positions) == 1151
    assert profile_batch(100, 4096, 16).num_tokens == [100]



def test_a_short_max_model_len_below_the_token_budget_sizes_and_serves_on_gpu(tiny_llama):
    """The profiling step of an engine whose max_model_len is below its token budget (the
    case that read RoPE rows past the table) runs, sizes the cache and the engine answers."""
    import pytest
    import torch

    if not torch.cuda.is_available():
        pytest.skip("the memory profile runs on a GPU")
    from test_engine_vs_hf import prompts, run

    from tandem.engine.config import EngineConfig
    from tandem.engine.core import EngineCore

    free, total = torch.cuda.mem_get_info()  # earlier tests may hold memory: 5 % beyond it
    util = min(0.95, (total - free) / total + 0.05)
    core = EngineCore(EngineConfig(model=str(tiny_llama), device="cuda", dtype="bfloat16",
                                   max_model_len=64, max_num_batched_tokens=256,
                                   gpu_memory_utilization=util))  # fmt: skip
    assert core.block_manager.num_blocks > 0
    got, _ = run(core, prompts([20, 30]), 4)
    assert [len(tokens) for tokens in got] == [4, 4]
