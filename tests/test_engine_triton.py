"""The GPU path (Triton attention, fused kernels, CUDA graphs) against transformers.

Without a GPU the engine runs the Triton kernels on CPU tensors under Triton's interpreter
(conftest sets TRITON_INTERPRET=1), so CI checks the same code path end to end on the tiny
models. With a GPU the same tests run natively, plus CUDA graphs against eager mode.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_engine_vs_hf import hf_greedy, prompts, run

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.engine.scheduler import ScheduledBatch
from tandem.engine.sequence import Sequence
from tandem.protocol import SamplingParams

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not os.environ.get("TRITON_INTERPRET"):
    pytest.skip("no GPU and no Triton interpreter", allow_module_level=True)
pytest.importorskip("triton") if os.environ.get("CI") != "true" else None


def engine(path, **overrides) -> EngineCore:
    config = dict(
        model=str(path),
        dtype="float32",
        device=DEVICE,
        attention_backend="triton",
        num_gpu_blocks=64,
        max_num_batched_tokens=48,
        max_num_seqs=8,
    )
    config.update(overrides)
    return EngineCore(EngineConfig(**config))


def test_logits_close(model_pair):
    path, hf = model_pair
    eng = engine(path, enforce_eager=True)
    prompt = prompts([37])[0]
    seq = Sequence("x", 0, prompt, SamplingParams())
    assert eng.block_manager.allocate(seq, len(prompt))
    ours = eng.runner.all_logits(ScheduledBatch([seq], [len(prompt)])).cpu()
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_greedy_mixed_batch_prefix_and_chunks(model_pair):
    """Chunked prefill (48-token budget), decodes beside prefills, and a prefix-cache hit
    that ends inside a block: every output equals transformers token for token."""
    path, hf = model_pair
    eng = engine(path)
    batch = prompts([5, 21, 70, 33])
    shared = batch[2][:40] + prompts([9], seed=1)[0]  # 40 cached tokens: 2.5 blocks
    got, _ = run(eng, [*batch, shared], 6)
    for prompt, tokens in zip([*batch, shared], got, strict=True):
        assert tokens == hf_greedy(hf, prompt, 6)
    assert eng.block_manager.prefix_hits >= 32


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graphs_equal_eager(tiny_llama):
    batch = prompts([12, 3, 40, 17, 9, 30])  # 6 decodes replay the graph of batch 8
    graphs, _ = run(engine(tiny_llama, max_num_batched_tokens=256), batch, 12)
    eager, _ = run(engine(tiny_llama, max_num_batched_tokens=256, enforce_eager=True), batch, 12)
    assert graphs == eager

