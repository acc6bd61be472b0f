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


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graphs_capture_while_another_thread_waits_on_the_gpu(tiny_llama):
    """Another thread synchronising on CUDA events while the engine captures its graphs (a
    KV tier's disk writer of an engine built before, say) leaves the capture intact."""
    import threading

    stop, done = threading.Event(), torch.cuda.Event()
    done.record()  # as the writer's copy was, before the engine was built

    def wait_on_events() -> None:
        while not stop.is_set():
            done.synchronize()

    waiter = threading.Thread(target=wait_on_events, daemon=True)
    waiter.start()
    try:
        batch = prompts([12, 3, 40, 17])
        graphs, _ = run(engine(tiny_llama, max_num_batched_tokens=256), batch, 8)
    finally:
        stop.set()
        waiter.join()
    eager, _ = run(engine(tiny_llama, max_num_batched_tokens=256, enforce_eager=True), batch, 8)
    assert graphs == eager


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graphs_equal_eager_at_every_split(tmp_path):
    """Decode graphs exist once per split-K factor; contexts from 100 to 4,100 tokens
    replay graphs of 1 to 8 splits (with and without the combine kernel) and decode as eager
    mode does."""
    from tandem.engine.testing import make_tiny_model

    path = make_tiny_model(tmp_path / "long", max_position_embeddings=4608)
    batch = prompts([100, 1100, 2100, 4100])
    opts = dict(max_num_batched_tokens=4608, num_gpu_blocks=1024, max_model_len=4608)
    for one in batch:  # alone, so the step's longest context picks the factor
        graphs, _ = run(engine(path, **opts), [one], 8)
        eager, _ = run(engine(path, enforce_eager=True, **opts), [one], 8)
        assert graphs == eager


@pytest.mark.skipif(not CUDA, reason="Triton compiles kernels on a GPU only")
@pytest.mark.parametrize("mode", [{}, {"async_scheduling": True}, {"enforce_eager": True}])
def test_no_kernel_compiles_once_started(tiny_llama, monkeypatch, mode):
    """Start-up compiles every Triton variant a step can need: requests of any length that
    join while others decode, chunked prompts and any batch size then compile nothing (a
    compile mid-serving stalls every live stream for about a second)."""
    import triton

    from tandem.protocol import GenerateRequest

    eng = engine(tiny_llama, dtype="bfloat16", max_num_batched_tokens=256, max_num_seqs=32,
                 num_gpu_blocks=1024, **mode)  # fmt: skip
    compiled: list[str] = []

    def record(**info) -> None:
        compiled.append(info["fn"].name)

    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", record)
    lengths = [1, 2, 3, 5, 8, 13, 16, 17, 31, 33, 64, 100, 129, 200, 255, 300, 511, 7, 4, 9]
    waiting = list(enumerate(prompts(lengths)))
    while waiting or eng.has_work():
        for _ in range(len(waiting) % 3 + 1):  # one to three new requests every step
            if waiting:
                i, prompt = waiting.pop()
                eng.add_request(GenerateRequest(
                    request_id=str(i), prompt_token_ids=prompt,
                    sampling=SamplingParams(max_tokens=5 + i, temperature=0.0, ignore_eos=True),
                ))  # fmt: skip
        eng.step()
    assert compiled == []

