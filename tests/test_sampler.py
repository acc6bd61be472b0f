"""Sampler semantics on hand-made logits, and seeded sampling through the engine."""

from __future__ import annotations

import math

import pytest
import torch

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.engine.sampler import Sampler
from tandem.engine.sequence import Sequence
from tandem.protocol import GenerateRequest, SamplingParams

EOS = 5


def logits_for(probs):
    return torch.log(torch.tensor([probs], dtype=torch.float32))


def draw(probs, times=200, **params):
    sampler = Sampler({EOS})
    seen = []
    for i in range(times):
        s = Sequence("r", 0, [1, 2], SamplingParams(seed=i, **params))
        seen.append(sampler(logits_for(probs), [s]).token_ids[0])
    return seen


def test_greedy_and_top_k_one_pick_argmax():
    sampler = Sampler({EOS})
    logits = torch.tensor([[0.1, 3.0, 0.2], [2.0, 0.0, 1.0]])
    seqs = [
        Sequence("a", 0, [0], SamplingParams(temperature=0.0)),
        Sequence("b", 0, [0], SamplingParams(temperature=1.5, top_k=1)),
    ]
    assert sampler(logits, seqs).token_ids == [1, 0]


def test_top_k_top_p_min_p_cut_the_tail():
    probs = [0.6, 0.3, 0.1]
    assert set(draw(probs, top_k=2)) == {0, 1}
    assert set(draw(probs, top_p=0.5)) == {0}
    assert set(draw(probs, top_p=0.85)) == {0, 1}
    assert set(draw(probs, min_p=0.6)) == {0}
    assert set(draw(probs)) == {0, 1, 2}


def test_sampling_follows_the_distribution():
    seen = draw([0.25, 0.75], times=2000)
    assert abs(seen.count(1) / 2000 - 0.75) < 0.04


def test_penalties_push_away_from_seen_tokens():
    sampler = Sampler({EOS})
    logits = torch.tensor([[1.0, 0.9, 0.0, 0.0]])

    def greedy(**params):
        s = Sequence("r", 0, [3], SamplingParams(temperature=0.0, **params))
        s.token_ids += [0, 0]  # token 0 generated twice already
        return sampler(logits, [s]).token_ids[0]

    assert greedy() == 0
    assert greedy(presence_penalty=0.5) == 1
    assert greedy(frequency_penalty=0.1) == 1  # 1.0 - 2 * 0.1 < 0.9
    assert greedy(frequency_penalty=0.04) == 0
    assert greedy(repetition_penalty=1.5) == 1  # 1.0 / 1.5 < 0.9


def test_min_tokens_forbids_eos_and_stop_tokens():
    sampler = Sampler({EOS})
    logits = torch.zeros(1, 8)
    logits[0, EOS] = 10.0
    logits[0, 6] = 9.0
    s = Sequence("r", 0, [1], SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[6]))
    assert sampler(logits, [s]).token_ids[0] not in (EOS, 6)
    s.token_ids += [1, 1]
    assert sampler(logits, [s]).token_ids[0] == EOS


def test_logprobs_are_raw_log_softmax_with_top_alternatives():
    sampler = Sampler({EOS})
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    s = Sequence("r", 0, [1], SamplingParams(temperature=0.0, logprobs=2))
    (lp,) = sampler(logits, [s]).logprobs
    expected = torch.log_softmax(logits[0], -1)
    assert lp.token_id == 0 and math.isclose(lp.logprob, float(expected[0]), rel_tol=1e-6)
    assert [t for t, _ in lp.top] == [0, 1]
    assert math.isclose(lp.top[1][1], float(expected[1]), rel_tol=1e-6)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return EngineCore(EngineConfig(model=str(tiny_llama), num_gpu_blocks=64))


def generate(engine, requests):
    for r in requests:
        engine.add_request(r)
    got: dict[tuple[str, int], list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            got.setdefault((out.request_id, out.index), []).extend(out.token_ids)
    return got


def sampled(rid, prompt, seed, n=1):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=seed, n=n, ignore_eos=True)
    return GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=params)


def test_same_seed_same_output_whatever_the_batch(engine):
    prompt = list(range(10, 30))
    alone = generate(engine, [sampled("a", prompt, seed=7)])[("a", 0)]
    others = [sampled(f"o{i}", list(range(40 + i, 60 + i)), seed=None) for i in range(3)]
    crowded = generate(engine, [*others, sampled("b", prompt, seed=7)])[("b", 0)]
    assert alone == crowded
    different = generate(engine, [sampled("c", prompt, seed=8)])[("c", 0)]
    assert different != alone


def test_n_sequences_are_distinct_and_reproducible(engine):
    prompt = list(range(10, 30))
    first = generate(engine, [sampled("n1", prompt, seed=3, n=3)])
    again = generate(engine, [sampled("n2", prompt, seed=3, n=3)])
    outs = [first[("n1", i)] for i in range(3)]
    assert outs == [again[("n2", i)] for i in range(3)]
    assert len({tuple(o) for o in outs}) == 3
    assert all(len(o) == 12 for o in outs)


def test_stop_token_ids_and_max_tokens_finish(engine):
    prompt = list(range(10, 30))
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.add_request(GenerateRequest(request_id="g", prompt_token_ids=prompt, sampling=greedy))
    outs = []
    while engine.has_work():
        outs += engine.step()
    tokens = [t for o in outs for t in o.token_ids]
    assert len(tokens) == 8 and outs[-1].finish_reason == "length"
    stop_at = tokens[3]
    first = tokens.index(stop_at)
    params = SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at]
    )
    engine.add_request(GenerateRequest(request_id="s", prompt_token_ids=prompt, sampling=params))
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert [t for o in outs for t in o.token_ids] == tokens[: first + 1]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_token_id == stop_at
