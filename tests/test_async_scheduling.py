"""`async_scheduling`: each step is queued before the previous step's tokens are read.

The overlap must change nothing a client sees: the same tokens (greedy and seeded), the same
finish reasons, through chunked prefill, preemption, stop tokens, max_tokens, aborts
mid-flight and batches that fall back to the synchronous path (penalties, logprobs).
"""

from __future__ import annotations

import pytest
import torch
from test_engine_vs_hf import prompts

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.protocol import GenerateRequest, SamplingParams


def engine(path, overlap: bool, **overrides) -> EngineCore:
    config = dict(model=str(path), dtype="float32", num_gpu_blocks=64, async_scheduling=overlap)
    config.update(overrides)
    return EngineCore(EngineConfig(**config))


def drive(core: EngineCore, requests: list[GenerateRequest], abort_after: dict | None = None):
    """Tokens and finish reason per request id; `abort_after[rid] = k` aborts a request once
    k of its tokens have come out."""
    for r in requests:
        core.add_request(r)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    reasons: dict[str, str] = {}
    steps = 0
    while core.has_work():
        steps += 1
        assert steps < 2000, "the engine never finished"
        for out in core.step():
            tokens[out.request_id] += out.token_ids
            if out.finish_reason:
                reasons[out.request_id] = out.finish_reason
            limit = (abort_after or {}).get(out.request_id)
            if limit is not None and len(tokens[out.request_id]) >= limit and not out.finish_reason:
                for aborted in core.abort(out.request_id):
                    reasons[aborted.request_id] = aborted.finish_reason
    return tokens, reasons


def requests(sampling: list[SamplingParams], lengths: list[int], seed: int = 0):
    return [
        GenerateRequest(request_id=str(i), prompt_token_ids=p, sampling=s)
        for i, (p, s) in enumerate(zip(prompts(lengths, seed=seed), sampling, strict=True))
    ]


def both(path, reqs_factory, abort_after=None, **overrides):
    sync = drive(engine(path, False, **overrides), reqs_factory(), abort_after)
    overlapped_engine = engine(path, True, **overrides)
    overlapped = drive(overlapped_engine, reqs_factory(), abort_after)
    assert overlapped_engine.block_manager.num_active_blocks == 0
    assert overlapped_engine.num_overlapped_steps > 0
    return sync, overlapped


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_seeded_chunked_and_stops_equal(tiny_models, arch):
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=9, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    sampled = SamplingParams(max_tokens=15, temperature=0.8, top_k=20, seed=3)
    params = [greedy, seeded, sampled, greedy, seeded]

    def make():
        return requests(params, [5, 40, 17, 64, 3])

    sync, overlapped = both(tiny_models[arch], make, max_num_batched_tokens=32)
    assert overlapped == sync
    assert set(sync[1].values()) <= {"length", "stop"}


def test_stop_token_mid_flight_drops_the_extra_token(tiny_llama):
    """A stop token is seen one step late: the step already queued for that sequence must
    not leak a token after the stop."""
    probe = drive(
        engine(tiny_llama, False),
        requests([SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)], [9]),
    )[0]["0"]
    stop_at = probe[3]

    def make():
        p = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop_at])
        return requests([p, p], [9, 13])

    sync, overlapped = both(tiny_llama, make)
    assert overlapped == sync
    assert sync[0]["0"][-1] == stop_at and sync[1]["0"] == "stop"


def test_preemption_and_fallback_batches_equal(tiny_llama):
    """Too few blocks (preemption while a token is in flight), plus requests whose sampling
    reads past tokens (penalties, logprobs) that force synchronous steps in between."""
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    penalised = SamplingParams(
        max_tokens=10, temperature=0.0, ignore_eos=True, repetition_penalty=1.3
    )
    with_logprobs = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)

    def make():
        return requests([plain, plain, penalised, plain, with_logprobs], [30, 28, 12, 29, 7], 3)

    sync, overlapped = both(tiny_llama, make, num_gpu_blocks=12, max_model_len=128)
    assert overlapped == sync


def test_abort_while_in_flight(tiny_llama):
    p = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)

    def make():
        return requests([p, p, p], [6, 11, 4])

    sync, overlapped = both(tiny_llama, make, abort_after={"1": 5})
    assert overlapped == sync
    assert sync[1]["1"] == "abort" and len(sync[0]["1"]) == 5


def test_triton_path_overlapped_equals_sync(tiny_llama):
    """The device-side fill-in of in-flight tokens through the Triton backend (and, on a
    GPU, the CUDA graphs)."""
    greedy = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=7, temperature=1.0, seed=11, ignore_eos=True)

    def make():
        return requests([greedy, seeded, greedy], [5, 19, 8])

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync, overlapped = both(tiny_llama, make, attention_backend="triton", device=device)
    assert overlapped == sync


def test_default_overlaps_on_a_gpu_only(tiny_llama):
    """None (the default) means on with CUDA, off on CPU; an explicit choice wins."""
    assert engine(tiny_llama, None).async_scheduling is False
    assert engine(tiny_llama, True).async_scheduling is True
    if torch.cuda.is_available():
        assert engine(tiny_llama, None, device="cuda").async_scheduling is True
        assert engine(tiny_llama, False, device="cuda").async_scheduling is False


@pytest.mark.parametrize("overlap", [False, True])
def test_every_batch_is_timed_once_for_the_step_model(tiny_llama, overlap):
    """The step samples (the planner's and the router's rates learn from them) add up to the
    work done: each prompt token and each decode counted once, overlapped or not (with
    overlap on a GPU a step's time is paired with the batch it waited for)."""
    lengths = [5, 40, 17, 64]
    core = engine(tiny_llama, overlap, max_num_batched_tokens=32)
    sampling = [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)] * len(lengths)
    drive(core, requests(sampling, lengths))
    samples = core.take_step_samples()
    assert sum(s.prompt_tokens for s in samples) == sum(lengths)
    assert sum(s.decodes for s in samples) == len(lengths) * 5  # the first token is a prefill's
    assert all(s.seconds > 0 for s in samples) and core.take_step_samples() == []
