"""Our engine against Hugging Face transformers on the same random weights.

Greedy outputs must match token for token, whatever the batching does to a request:
mixed prefill/decode batches, chunked prefill, prefix-cache hits, preemption.
"""

from __future__ import annotations

import torch

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.engine.scheduler import ScheduledBatch
from tandem.engine.sequence import Sequence
from tandem.protocol import GenerateRequest, SamplingParams

LOGIT_ATOL = 1e-4  # float32 on CPU; differences come from summation order only


def prompts(lengths, seed=0, vocab=384):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf, prompt, max_new):
    """Greedy continuation by plain forward passes: no EOS handling, no logits processors."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            logits = hf(torch.tensor([tokens])).logits[0, -1]
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt) :]


def run(engine, batch, max_new):
    for i, p in enumerate(batch):
        engine.add_request(
            GenerateRequest(
                request_id=str(i),
                prompt_token_ids=p,
                sampling=SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True),
            )
        )
    got: dict[str, list[int]] = {}
    finished = {}
    while engine.has_work():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finish_reason:
                finished[out.request_id] = out
    assert all(f.finish_reason == "length" for f in finished.values())
    return [got[str(i)] for i in range(len(batch))], finished


def test_logits_close(model_pair):
    path, hf = model_pair
    engine = EngineCore(EngineConfig(model=str(path), dtype="float32", num_gpu_blocks=32))
    prompt = prompts([37])[0]
    seq = Sequence("x", 0, prompt, SamplingParams())
    assert engine.block_manager.allocate(seq, len(prompt))
    ours = engine.runner.all_logits(ScheduledBatch([seq], [len(prompt)]))
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=LOGIT_ATOL, rtol=1e-4)


def test_single_requests_match(model_pair):
    path, hf = model_pair
    engine = EngineCore(EngineConfig(model=str(path), dtype="float32", num_gpu_blocks=64))
    for p in prompts([1, 7, 16, 33]):
        ours, _ = run(engine, [p], 12)
        assert ours[0] == hf_greedy(hf, p, 12)


def test_mixed_batch_with_chunked_prefill(model_pair):
    path, hf = model_pair
    # A budget of 24 tokens per step splits the long prompts over several steps while
    # the short ones are already decoding.
    engine = EngineCore(
        EngineConfig(
            model=str(path), dtype="float32", num_gpu_blocks=128, max_num_batched_tokens=24
        )
    )
    batch = prompts([5, 50, 3, 70, 18], seed=1)
    ours, _ = run(engine, batch, 10)
    for p, got in zip(batch, ours, strict=True):
        assert got == hf_greedy(hf, p, 10)


def test_prefix_cache_hits_match(model_pair):
    path, hf = model_pair
    engine = EngineCore(EngineConfig(model=str(path), dtype="float32", num_gpu_blocks=64))
    shared = prompts([40], seed=2)[0]
    first, _ = run(engine, [shared + [5, 6, 7]], 6)
    # Two followers share 2 full blocks (32 tokens) of the first prompt.
    followers = [shared + [9, 10], shared[:35] + [11, 12, 13, 14]]
    ours, finished = run(engine, followers, 8)
    assert [f.num_cached_tokens for f in finished.values()] == [32, 32]
    for p, got in zip(followers, ours, strict=True):
        assert got == hf_greedy(hf, p, 8)
    assert first[0] == hf_greedy(hf, shared + [5, 6, 7], 6)


def test_preemption_recomputes_to_same_output(model_pair):
    path, hf = model_pair
    # 10 blocks of 16 tokens cannot hold four 30-token prompts growing by 24 tokens each.
    engine = EngineCore(
        EngineConfig(model=str(path), dtype="float32", num_gpu_blocks=10, max_model_len=128)
    )
    batch = prompts([30, 28, 31, 29], seed=3)
    ours, _ = run(engine, batch, 24)
    assert engine.scheduler.num_preemptions > 0
    for p, got in zip(batch, ours, strict=True):
        assert got == hf_greedy(hf, p, 24)
    assert engine.block_manager.num_active_blocks == 0
