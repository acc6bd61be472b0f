"""The marginal cost of a prompt token, fitted to step times: recovered from mixed steps,
refused when the steps cannot tell it, and published by the engine."""

from __future__ import annotations

import random

import pytest

from tandem.engine.step_fit import StepFit


def test_the_fit_recovers_the_cost_of_a_prompt_token_from_mixed_steps():
    fit, rng = StepFit(), random.Random(0)
    for _ in range(300):
        n, b = rng.choice([0, 0, 128, 512, 2048]), rng.randint(0, 64)
        if n or b:
            ctx = b * rng.randint(200, 3000)
            fit.add(n, b, ctx, 0.0165 + 1.5e-5 * n + 4e-5 * b + 1e-8 * ctx + rng.gauss(0, 1e-4))
    assert fit.seconds_per_prompt_token() == pytest.approx(1.5e-5, rel=0.02)
    assert type(fit.seconds_per_prompt_token()) is float  # msgspec encodes no numpy scalars


def test_steps_that_do_not_vary_tell_nothing():
    fit = StepFit()
    for _ in range(50):
        fit.add(2048, 10, 5000, 0.05)  # every step a full chunk beside the same decodes
    assert fit.seconds_per_prompt_token() is None
    assert StepFit().seconds_per_prompt_token() is None


def test_the_engine_publishes_the_marginal_prefill_rate(tiny_llama):
    """The mock's steps cost 16.5 ms + 0.0152 ms a token (+ a small quadratic): over prompts
    of several lengths the published rate is the slope's, not tokens over whole steps."""
    from tandem.engine.config import EngineConfig
    from tandem.engine.core import EngineCore
    from tandem.protocol import GenerateRequest, SamplingParams

    speedup = 2.0  # steps of 8-12 ms: the slope stands well above the timing noise
    eng = EngineCore(EngineConfig(model=str(tiny_llama), engine="mock", num_gpu_blocks=512,
                                  mock_speedup=speedup, enable_prefix_caching=False))  # fmt: skip
    for i, n in enumerate([32, 256, 64, 448, 128, 384, 48, 320] * 2):
        eng.add_request(GenerateRequest(request_id=str(i), prompt_token_ids=[5] * n,
                                        sampling=SamplingParams(max_tokens=2)))  # fmt: skip
        while eng.has_work():
            eng.step()
    slope_ms = 0.01518344 + 2 * 4.209989e-7 * 250  # at the lengths' middle
    assert eng.stats().prefill_tokens_per_s == pytest.approx(speedup * 1e3 / slope_ms, rel=0.3)
    assert eng.stats().prefill_tokens_per_s > 1.5 * eng.step_times.prefill_rate.value
    import msgspec

    msgspec.msgpack.encode(eng.stats())  # what a worker publishes
