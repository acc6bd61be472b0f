"""Sampler semantics on hand-made logits, the counter-based noise, and seeded sampling through
the engine."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tandem.engine import sampling_noise
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


def test_logprobs_for_a_mixed_batch_in_one_read():
    torch.manual_seed(0)
    sampler = Sampler({EOS})
    logits = torch.randn(5, 40) * 2
    ks = [None, 0, 3, None, 7]
    seqs = [
        Sequence(f"r{i}", 0, [1], SamplingParams(temperature=0.0 if i % 2 else 0.9, logprobs=k))
        for i, k in enumerate(ks)
    ]
    result = sampler(logits, seqs)
    expected = torch.log_softmax(logits, -1)
    for i, (k, lp) in enumerate(zip(ks, result.logprobs, strict=True)):
        if k is None:
            assert lp is None
            continue
        token = result.token_ids[i]
        assert lp.token_id == token
        assert math.isclose(lp.logprob, float(expected[i, token]), rel_tol=1e-6, abs_tol=1e-7)
        values, ids = expected[i].topk(k) if k else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in lp.top] == ids.tolist()
        assert all(isinstance(t, int) for t, _ in lp.top)
        assert [v for _, v in lp.top] == values.tolist()  # float32 values, exactly


# -- counter-based noise ------------------------------------------------------------------


def test_noise_bits_match_the_reference_definition():
    rows = [(0, 0, 0), (1, 0, 0), (-5, 3, 17), (2**64 - 1, 15, 2**31), (12345678901234567890, 1, 1)]
    keys = sampling_noise.row_keys(*zip(*rows, strict=True))
    for key, row in zip(keys.tolist(), rows, strict=True):
        assert key & sampling_noise.MASK64 == sampling_noise.key_reference(*row)
    got = sampling_noise.bits(torch.from_numpy(keys), 64).tolist()
    for r, row in enumerate(rows):
        want = [sampling_noise.bits_reference(*row, t) for t in range(64)]
        assert [b & sampling_noise.MASK64 for b in got[r]] == want


def noise_uniform(seeds, indices, positions, vocab):
    keys = torch.from_numpy(sampling_noise.row_keys(seeds, indices, positions))
    return sampling_noise.uniform(keys, vocab)


def test_noise_is_uniform_and_strictly_inside_the_unit_interval():
    u = noise_uniform(range(256), [0] * 256, [3] * 256, 4096)
    assert u.dtype == torch.float32 and u.shape == (256, 4096)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 2e-3
    assert abs(float(u.var()) - 1 / 12) < 2e-3
    histogram = torch.histc(u, bins=16, min=0.0, max=1.0) / u.numel()
    assert float((histogram - 1 / 16).abs().max()) < 2e-3
    e = sampling_noise.exponential(torch.from_numpy(sampling_noise.row_keys([9], [0], [0])), 10**6)
    assert float(e.min()) > 0.0 and math.isfinite(float(e.max()))
    assert abs(float(e.mean()) - 1.0) < 0.01 and abs(float(e.var()) - 1.0) < 0.02


def test_noise_is_deterministic_and_decorrelated():
    n, vocab = 64, 4096
    base = noise_uniform(range(n), [0] * n, [5] * n, vocab)
    assert torch.equal(base, noise_uniform(range(n), [0] * n, [5] * n, vocab))
    neighbours = {
        "seed": noise_uniform(range(1, n + 1), [0] * n, [5] * n, vocab),
        "index": noise_uniform(range(n), [1] * n, [5] * n, vocab),
        "position": noise_uniform(range(n), [0] * n, [6] * n, vocab),
        "token": torch.roll(base, 1, dims=1),
    }
    for name, other in neighbours.items():
        corr = torch.corrcoef(torch.stack([base.flatten(), other.flatten()]))[0, 1]
        assert abs(float(corr)) < 0.01, name
        assert float((base == other).float().mean()) < 1e-3, name


def test_noise_rows_write_into_chosen_rows_of_out():
    keys = torch.from_numpy(sampling_noise.row_keys([4, 5], [0, 0], [1, 1]))
    out = torch.full((4, 100), -1.0)
    sampling_noise.exponential(keys, 100, out=out, rows=torch.tensor([3, 1]))
    alone = sampling_noise.exponential(keys, 100)
    assert torch.equal(out[3], alone[0]) and torch.equal(out[1], alone[1])
    assert torch.equal(out[[0, 2]], torch.full((2, 100), -1.0))


@pytest.mark.skipif(not sampling_noise.HAS_TRITON, reason="needs triton")
def test_noise_kernel_matches_the_torch_ops():
    """On a CPU in Triton's interpreter (conftest), on a GPU compiled: same bits exactly, the
    same noise to float rounding of log, and `rows` placement."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    keys = torch.from_numpy(sampling_noise.row_keys([0, 7, -1], [0, 2, 1], [0, 9, 2**40]))
    keys = keys.to(device)
    vocab = 2500  # not a multiple of the kernel's block
    assert torch.equal(sampling_noise.bits_triton(keys, vocab), sampling_noise.bits(keys, vocab))
    want = sampling_noise.exponential_torch(keys, vocab)
    got = sampling_noise.exponential_triton(keys, vocab)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    out = torch.zeros(5, vocab, device=device)
    sampling_noise.exponential_triton(keys, vocab, out=out, rows=torch.tensor([4, 0, 2]).to(device))
    assert torch.equal(out[[4, 0, 2]], got) and not out[[1, 3]].any()


# -- seeded sampling through the sampler ----------------------------------------------------


def seeded(seed, prompt=(1, 2), index=0, **params):
    params.setdefault("temperature", 1.0)
    return Sequence("s", index, list(prompt), SamplingParams(seed=seed, **params))


def step_logits(step, rows=1, vocab=64):
    """The same logits at a step whatever the batch: row j of step `step`."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(rows, vocab, generator=g) * 2


def run_steps(sampler, seq, steps, make_batch=None):
    """Sample `steps` tokens for `seq`, appending each; `make_batch(step)` puts it among
    others: a list of sequences with None where `seq` goes."""
    for step in range(seq.num_output_tokens, seq.num_output_tokens + steps):
        batch = make_batch(step) if make_batch else [None]
        seqs = [seq if s is None else s for s in batch]
        rows = step_logits(step, vocab=64).expand(len(seqs), 64).clone()
        rows[[i for i, s in enumerate(batch) if s is not None]] += 0.5  # others differ
        at = batch.index(None)
        seq.token_ids.append(sampler(rows, seqs).token_ids[at])
    return seq.output_ids


def test_seeded_tokens_do_not_depend_on_the_batch():
    sampler = Sampler({EOS})
    params = {"top_p": 0.95, "top_k": 40}
    alone = run_steps(sampler, seeded(7, **params), 12)
    rng = random.Random(0)

    def crowd(step):
        others = [
            Sequence("o", 0, [3], SamplingParams(temperature=rng.choice([0.0, 0.7, 1.3])))
            for _ in range(rng.randrange(1, 6))
        ]
        others += [seeded(rng.randrange(100), index=1, **params) for _ in range(2)]
        others.insert(rng.randrange(len(others) + 1), None)
        return others

    assert run_steps(sampler, seeded(7, **params), 12, crowd) == alone
    assert run_steps(sampler, seeded(8, **params), 12) != alone
    assert run_steps(sampler, seeded(7, index=1, **params), 12) != alone


def test_seeded_sequence_resumes_from_its_tokens():
    """What a decode worker does with a migrated sequence: a new Sequence holding the prompt
    and the generated tokens continues the same stream."""
    sampler = Sampler({EOS})
    full = run_steps(sampler, seeded(42, index=2, min_p=0.05), 10)
    resumed = seeded(42, index=2, min_p=0.05)
    resumed.token_ids += full[:4]
    assert run_steps(sampler, resumed, 6) == full


def frequencies(tokens, vocab):
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


@pytest.mark.parametrize("seed", ["all", "none", "half"])
def test_batched_draws_follow_the_distribution(seed):
    """Many rows of one batch, each its own draw: frequencies match softmax(logits / T), with
    every row, no row or every other row seeded (on a CPU the unseeded rows take another
    method than the seeded ones)."""
    logits = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5])
    rows, temperature = 20000, 0.8
    seeds = {"all": range(rows), "none": [None] * rows,
             "half": [i if i % 2 else None for i in range(rows)]}[seed]  # fmt: skip
    seqs = [Sequence("d", 0, [1], SamplingParams(temperature=temperature, seed=s)) for s in seeds]
    got = Sampler({EOS})(logits.expand(rows, -1).contiguous(), seqs).token_ids
    want = torch.softmax(logits.double() / temperature, -1)
    assert float((frequencies(got, 5) - want).abs().max()) < 0.012


def test_unseeded_draws_never_pick_a_cut_token():
    """The CPU's unseeded draw (inverse CDF) gives zero mass to what top-k and min-p cut."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    for params, allowed in (({"top_k": 2}, {0, 1}), ({"min_p": 0.5}, {0, 1})):
        seqs = [Sequence("u", 0, [1], SamplingParams(temperature=1.0, **params))] * 4000
        got = Sampler({EOS})(logits.expand(len(seqs), -1).contiguous(), seqs).token_ids
        assert set(got) == allowed


def test_one_seeded_stream_follows_the_distribution():
    """One sequence over many positions (the counter's direction): also distributed as p."""
    sampler = Sampler({EOS})
    seq = seeded(3)
    probs = [0.1, 0.2, 0.3, 0.4]
    logits = logits_for(probs)
    for _ in range(4000):
        seq.token_ids.append(sampler(logits, [seq]).token_ids[0])
    got = frequencies(seq.output_ids, 4)
    assert float((got - torch.tensor(probs, dtype=torch.double)).abs().max()) < 0.025


def test_greedy_rows_in_a_sampled_batch_take_the_argmax():
    torch.manual_seed(1)
    logits = torch.randn(6, 30)
    seqs = [
        Sequence("m", 0, [1], SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i))
        for i in range(6)
    ]
    got = Sampler({EOS})(logits, seqs).token_ids
    assert got[1::2] == logits[1::2].argmax(-1).tolist()


# -- penalties and min_tokens against a per-row reference -----------------------------------


def reference_adjusted(logits, seqs, eos):
    """vLLM/OpenAI semantics, one row at a time: repetition over prompt and output tokens,
    then frequency and presence over output tokens; then min_tokens blocks."""
    out = logits.clone()
    for i, s in enumerate(seqs):
        p = s.sampling
        row = out[i]
        if p.repetition_penalty != 1.0:
            for t in set(s.token_ids):
                v = float(row[t])
                row[t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        for t in set(s.output_ids):
            count = s.output_ids.count(t)
            row[t] -= p.frequency_penalty * count + p.presence_penalty
        if s.num_output_tokens < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else eos)
            row[list(stops)] = float("-inf")
    return out


def test_penalties_and_min_tokens_match_a_per_row_reference():
    rng = random.Random(5)
    torch.manual_seed(5)
    vocab, eos = 50, {EOS, 7}
    seqs = []
    for i in range(12):
        params = SamplingParams(
            temperature=rng.choice([0.0, 0.8]),
            repetition_penalty=rng.choice([1.0, 1.3, 0.7]),
            presence_penalty=rng.choice([0.0, 0.5, -0.4]),
            frequency_penalty=rng.choice([0.0, 0.25, -0.1]),
            min_tokens=rng.choice([0, 0, 3, 20]),
            stop_token_ids=rng.sample(range(vocab), rng.randrange(3)),
            ignore_eos=rng.random() < 0.3,
        )
        s = Sequence(
            f"p{i}", 0, [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))], params
        )
        s.token_ids += [rng.randrange(vocab // 4) for _ in range(rng.randrange(0, 12))]
        seqs.append(s)
    logits = torch.randn(len(seqs), vocab) * 3
    before = logits.clone()
    sampler = Sampler(eos)
    got = sampler.adjusted_logits(logits, seqs)
    torch.testing.assert_close(got, reference_adjusted(logits, seqs, eos), rtol=1e-6, atol=1e-6)
    assert torch.equal(logits, before)  # the caller's logits are left alone
    greedy = [i for i, s in enumerate(seqs) if s.sampling.temperature == 0.0]
    tokens = sampler(logits, seqs).token_ids
    assert [tokens[i] for i in greedy] == got[greedy].argmax(-1).tolist()
    # A batch of only penalised rows, and a single one, take the no-gather path.
    pen = [s for s in seqs if s.sampling.repetition_penalty != 1.0]
    rows = [i for i, s in enumerate(seqs) if s.sampling.repetition_penalty != 1.0]
    torch.testing.assert_close(
        sampler.adjusted_logits(logits[rows], pen),
        reference_adjusted(logits[rows], pen, eos),
        rtol=1e-6,
        atol=1e-6,
    )


def test_min_tokens_blocks_eos_and_stop_ids_batched():
    sampler = Sampler({EOS})
    logits = torch.zeros(3, 8)
    logits[:, EOS], logits[:, 6], logits[:, 2] = 10.0, 9.0, 8.0
    seqs = [
        Sequence("a", 0, [1], SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=[6])),
        Sequence("b", 0, [1], SamplingParams(temperature=0.0, min_tokens=1, ignore_eos=True)),
        Sequence("c", 0, [1], SamplingParams(temperature=0.0)),
    ]
    assert sampler(logits, seqs).token_ids == [2, EOS, EOS]


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
