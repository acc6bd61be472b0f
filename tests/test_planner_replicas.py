"""The planner's step model and replica calculator on hand-computed cases."""

from __future__ import annotations

import json

import pytest

from tandem.planner import PoolBounds, StepModel, decode_replicas, prefill_replicas
from tandem.planner.replicas import settled_step


def linear_model(prefill_per_token: float = 1e-3, decode_base: float = 0.01,
                 decode_per_seq: float = 5e-4) -> StepModel:  # fmt: skip
    """Steps that follow the given costs exactly (what the fits must recover)."""
    model = StepModel()
    for n in (64, 128, 256, 512, 1024, 2048):
        model.add_prefill(n, prefill_per_token * n)
    for batch in (1, 2, 4, 8, 16, 32):
        for context in (100, 1000):
            model.add_decode(batch, batch * context, decode_base + decode_per_seq * batch)
    return model


def test_the_step_model_recovers_the_step_costs_and_waits_for_enough_points():
    model = linear_model()
    assert model.prefill_s(300) == pytest.approx(0.3, rel=1e-6)
    assert model.decode_s(10, 5000) == pytest.approx(0.015, rel=1e-6)
    quadratic = StepModel()
    for n in (100, 200):
        quadratic.add_prefill(n, 1e-3 * n + 1e-7 * n * n)
    assert quadratic.prefill_s(100) is None, "two prompt lengths do not fix a quadratic"
    quadratic.add_prefill(400, 1e-3 * 400 + 1e-7 * 400**2)
    assert quadratic.prefill_s(1000) == pytest.approx(1.0 + 0.1, rel=1e-6)
    assert StepModel().decode_s(1, 1) is None


def test_the_step_model_forgets_beyond_its_window():
    model = StepModel(window=6)
    for n in (10, 20, 30):
        model.add_prefill(n, 1.0)  # a slow seed
    for n in (100, 200, 300, 400, 500, 600):
        model.add_prefill(n, 1e-3 * n)
    assert model.prefill_s(250) == pytest.approx(0.25, rel=1e-6)


def test_a_profile_seeds_the_model(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"prefill": [[n, n * 1.0] for n in (100, 200, 400)],
                                "decode": [[b, 500, 10 + b] for b in (1, 4, 16)]}))  # fmt: skip
    model = StepModel.from_profile(path)
    assert model.prefill_s(300) == pytest.approx(0.3, rel=1e-6)
    assert model.decode_s(8, 4000) == pytest.approx(0.018, rel=1e-6)
    path.write_text("{}")
    with pytest.raises(ValueError, match="performance profile"):
        StepModel.from_profile(path)


def test_prefill_replicas_by_queueing_on_the_service_times():
    """100-token prompts at 1 ms a token: S = 0.1 s. At 10 req/s one worker is saturated;
    two wait 5 * 0.01 / (2 * 0.5) = 0.05 s (TTFT 0.15); four wait 0.0167 s (0.117)."""
    model, bounds = linear_model(), PoolBounds(1, 8)
    assert prefill_replicas(model, 10.0, [100] * 50, ttft_s=0.5, bounds=bounds) == 2
    assert prefill_replicas(model, 10.0, [100] * 50, ttft_s=0.12, bounds=bounds) == 4
    assert prefill_replicas(model, 10.0, [100] * 50, ttft_s=0.05, bounds=bounds) == 8  # none do
    assert prefill_replicas(model, 0.0, [100], ttft_s=0.5, bounds=PoolBounds(2, 8)) == 2
    assert prefill_replicas(StepModel(), 10.0, [100], ttft_s=0.5, bounds=bounds) is None


def test_prefill_replicas_see_the_tail_of_the_lengths_not_only_the_mean():
    """Same mean prompt (100 tokens), one in ten 10x longer: the long ones set the tail and
    the second moment, so the pool must be larger."""
    model, bounds = linear_model(), PoolBounds(1, 16)
    even = prefill_replicas(model, 5.0, [100] * 10, ttft_s=0.55, bounds=bounds)
    skewed = prefill_replicas(model, 5.0, [1000] + [0] * 9, ttft_s=0.55, bounds=bounds)
    # even, one worker: wait 5 * 0.01 / (2 * 0.5) = 0.05 s + S 0.1. skewed: E[S^2] = 0.1, so
    # one worker waits 0.5 s (+ its p90 service 0.1): too long; two wait 0.167 s.
    assert (even, skewed) == (1, 2)


def test_decode_replicas_by_littles_law_and_the_kv_that_fits():
    """10 req/s of 100 output tokens: 1,000 tokens/s. A step of b sequences takes 10 + 0.5 b
    ms and a worker streaming r tokens/s decodes b = r·s at once, so it settles at s = 10 /
    (1 - 0.0005 r) ms; the target holds for the p90 batch, b + 1.28 sqrt(b). One worker: s =
    20 ms, b = 20, p90 25.7: 22.9 ms. Two: 13.3 ms, b = 6.7, p90 10.0: 15.0 ms. Three: 12 ms,
    b = 4, p90 6.6: 13.3 ms. Four: 11.4 ms, b = 2.9, p90 5.0: 12.5 ms."""
    model, bounds = linear_model(), PoolBounds(1, 8)
    args = dict(prompt_tokens=[500] * 10, output_tokens=[100] * 10, bounds=bounds)
    assert decode_replicas(model, 10.0, itl_s=0.021, kv_tokens_per_worker=10**6, **args) == 2
    assert decode_replicas(model, 10.0, itl_s=0.013, kv_tokens_per_worker=10**6, **args) == 4
    # p90 batches of 600-token sequences: 6,000 tokens of KV for two, 3,900 for three.
    assert decode_replicas(model, 10.0, itl_s=0.021, kv_tokens_per_worker=5000, **args) == 3
    # A lax target does not ask for more workers (the batch follows the real step, not the
    # target); 30 req/s is past one worker's 2,000 tokens/s: its steps run away.
    assert decode_replicas(model, 10.0, itl_s=10.0, kv_tokens_per_worker=10**6, **args) == 1
    assert decode_replicas(model, 30.0, itl_s=10.0, kv_tokens_per_worker=10**6, **args) == 2
    assert decode_replicas(StepModel(), 10.0, itl_s=0.02, kv_tokens_per_worker=1, **args) is None


def test_a_gap_beyond_the_step_counts_in_every_token():
    """A token takes its step plus 1 ms (the host's own work between steps): at a 13 ms
    target four workers no longer do (s = 11 / (1 - 0.125) = 12.6 ms, b = 3.1, p90 5.4:
    13.7 ms), six do (s = 12.0 ms, b = 2.0, p90 3.8: 12.9 ms). One of three workers at
    10 req/s settles at 12 ms (above)."""
    model, bounds = linear_model(), PoolBounds(1, 8)
    args = dict(prompt_tokens=[500] * 10, output_tokens=[100] * 10, bounds=bounds,
                itl_s=0.013, kv_tokens_per_worker=10**6)  # fmt: skip
    assert decode_replicas(model, 10.0, **args) == 4
    assert decode_replicas(model, 10.0, step_gap_s=0.001, **args) == 6
    step = settled_step(model, 10.0 / 3, [500] * 10, [100] * 10, itl_s=0.013)
    assert step == pytest.approx(0.012, rel=1e-3)


def test_pool_bounds_are_checked():
    with pytest.raises(ValueError, match="replica bounds"):
        PoolBounds(3, 2)


def test_a_quiet_spell_of_one_batch_size_keeps_what_the_model_learned():
    model = StepModel(window=6)
    for batch in (1, 2, 4, 8):
        model.add_decode(batch, batch * 100, 0.01 + 5e-4 * batch)
    assert model.decode_s(10, 1000) is not None  # the planner asks every interval
    for _ in range(6):  # the window now holds one batch size only: no new fit, the old one
        model.add_decode(1, 100, 0.0105)
    assert model.decode_s(10, 1000) == pytest.approx(0.015, rel=1e-6)
