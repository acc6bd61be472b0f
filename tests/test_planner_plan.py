"""The planner's decision per interval: sizing from the forecast, the reactive correction,
slow shrinking (a restart does not thrash), and the GPU budget."""

from __future__ import annotations

import dataclasses

import pytest

from tandem.planner import PoolBounds
from tandem.planner.plan import Observation, Planner, PlannerConfig
from tests.test_planner_replicas import linear_model


def seen(rate: float, p: int, d: int, ttft=None, itl=None, seconds: float = 10.0) -> Observation:
    n = int(rate * seconds)
    return Observation(seconds=seconds, requests=n, prompt_tokens=[100] * n,
                       output_tokens=[100] * n, ttft_p90_s=ttft, itl_p90_s=itl,
                       prefill_replicas=p, decode_replicas=d)  # fmt: skip


CONFIG = PlannerConfig(ttft_s=0.12, itl_s=0.013, prefill=PoolBounds(1, 8),
                       decode=PoolBounds(1, 8), gpu_budget=12, shrink_after=3)  # fmt: skip


def test_pools_are_sized_from_the_forecast_load():
    """10 req/s of 100-token prompts and answers: 4 prefill workers and 4 decode workers (the
    replica calculator's hand-computed cases)."""
    planner = Planner(CONFIG, linear_model())
    decision = planner.step(seen(10.0, 1, 1))
    assert (decision.prefill_replicas, decision.decode_replicas) == (4, 4)
    assert decision.forecast_rate == 10.0


def test_an_untrained_model_holds_the_pools():
    from tandem.planner import StepModel

    decision = Planner(CONFIG, StepModel()).step(seen(10.0, 2, 5))
    assert (decision.prefill_replicas, decision.decode_replicas) == (2, 5)
    assert "not ready" in decision.reasons[0]


def test_an_idle_prefill_pool_is_priced_by_the_decode_workers_prefill_steps():
    from tandem.planner import StepModel

    decision = Planner(CONFIG, StepModel(), linear_model()).step(seen(10.0, 1, 1))
    assert (decision.prefill_replicas, decision.decode_replicas) == (4, 4)


def test_a_missed_target_adds_a_worker_to_the_pool_at_fault():
    planner = Planner(CONFIG, linear_model())
    decision = planner.step(seen(10.0, 4, 4, ttft=0.3, itl=0.01))
    assert (decision.prefill_replicas, decision.decode_replicas) == (5, 4)
    assert any("TTFT" in r for r in decision.reasons)


def test_shrinking_waits_for_a_steady_lower_load_and_goes_one_at_a_time():
    """A restarted planner meets a large fleet and a light load: nothing is torn down at
    once; after `shrink_after` intervals one worker goes, and so on."""
    planner = Planner(CONFIG, linear_model())
    sizes = []
    p, d = 8, 4
    for _ in range(7):
        decision = planner.step(seen(1.0, p, d))
        p, d = decision.prefill_replicas, decision.decode_replicas
        sizes.append((p, d))
    assert sizes == [(8, 4), (8, 4), (7, 3), (7, 3), (7, 3), (6, 2), (6, 2)]
    # A heavier load that still needs fewer than the 6 there are: they stay (for now)...
    assert planner.step(seen(10.0, p, d)).prefill_replicas == 6
    # ...and one that needs more than there are gets them at once (more than 10 req/s would:
    # the jump is also an error of the forecast, which the margin now covers).
    assert planner.step(seen(10.0, 2, 1)).prefill_replicas >= 4


def test_no_shrinking_while_the_pools_workers_are_starting():
    """A fleet coming up has served nothing: an empty interval says nothing of its size."""
    planner = Planner(dataclasses.replace(CONFIG, shrink_after=1), linear_model())
    starting = dataclasses.replace(seen(0.0, 2, 3), prefill_starting=1, decode_starting=3)
    for _ in range(3):
        decision = planner.step(starting)
        assert (decision.prefill_replicas, decision.decode_replicas) == (2, 3)
    decision = planner.step(seen(0.0, 2, 3))  # all serving now, and still no traffic
    assert (decision.prefill_replicas, decision.decode_replicas) == (1, 2)


def test_an_aggregated_pool_grows_for_either_target_and_prefills_too():
    """No prefill pool: one pool whose workers also spend rate/n x 0.1 s a second on prompts,
    which stretches their decode steps. 2 and 5 req/s take 2 and 5 workers where split
    pools take 1+1 and 2+2; a missed TTFT adds to the one pool."""
    aggregated = dataclasses.replace(CONFIG, prefill=PoolBounds(0, 0))
    for rate, workers, split in ((2.0, 2, (1, 1)), (5.0, 5, (2, 2))):
        one = Planner(aggregated, linear_model()).step(seen(rate, 0, 1))
        assert (one.prefill_replicas, one.decode_replicas) == (0, workers)
        two = Planner(CONFIG, linear_model()).step(seen(rate, 1, 1))
        assert (two.prefill_replicas, two.decode_replicas) == split
    missed = Planner(aggregated, linear_model()).step(seen(5.0, 0, 6, ttft=0.5))
    assert (missed.prefill_replicas, missed.decode_replicas) == (0, 7)
    assert "TTFT" in missed.reasons[0]


def test_the_gpu_budget_cuts_the_prefill_pool_first():
    config = PlannerConfig(ttft_s=0.12, itl_s=0.0125, gpu_budget=5)
    decision = Planner(config, linear_model()).step(seen(10.0, 1, 1))
    assert (decision.prefill_replicas, decision.decode_replicas) == (2, 3)


def test_pools_are_sized_for_the_load_when_new_workers_would_serve():
    """A rising load, workers that take three intervals to start: the pools are sized for the
    rate three intervals on, not the next one's."""
    lead = Planner(dataclasses.replace(CONFIG, lead_intervals=3), linear_model())
    next_only = Planner(CONFIG, linear_model())
    for rate in (2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0):
        ahead, near = lead.step(seen(rate, 1, 1)), next_only.step(seen(rate, 1, 1))
    assert ahead.forecast_rate > near.forecast_rate + 3.0
    assert ahead.decode_replicas >= near.decode_replicas


def test_no_correction_while_the_pools_last_worker_is_still_starting():
    """A missed target with a worker already on its way: that worker is the correction."""
    planner = Planner(CONFIG, linear_model())
    waiting = dataclasses.replace(seen(10.0, 4, 4, ttft=0.3, itl=0.02), prefill_starting=1,
                                  decode_starting=1)  # fmt: skip
    decision = planner.step(waiting)
    assert (decision.prefill_replicas, decision.decode_replicas) == (4, 4)
    assert not decision.reasons


def test_no_correction_for_an_interval_a_new_worker_served_only_part_of():
    """The worker came up during the interval: the latencies seen were the smaller pool's."""
    planner = Planner(CONFIG, linear_model())
    before = dataclasses.replace(seen(10.0, 4, 4), decode_starting=1)
    assert planner.step(before).decode_replicas == 4
    missed = seen(10.0, 4, 4, itl=0.02)  # no worker starting now: the new one serves
    assert planner.step(missed).decode_replicas == 4
    assert planner.step(missed).decode_replicas == 5  # a full interval of 4 missed too


def test_the_gap_between_steps_is_learned_from_the_median_inter_token_latency():
    """Three decode workers at 10 req/s should settle at 12 ms steps; tokens came 17 ms
    apart: 5 ms a token went elsewhere, learned at 0.3 a interval, none below zero."""
    planner = Planner(CONFIG, linear_model())
    planner.step(dataclasses.replace(seen(10.0, 4, 3), itl_p50_s=0.017))
    assert planner.step_gap_s == pytest.approx(0.3 * 0.005, rel=1e-3)
    planner.step(dataclasses.replace(seen(10.0, 4, 3), itl_p50_s=0.002))
    assert planner.step_gap_s == pytest.approx(0.7 * 0.3 * 0.005, rel=1e-3)


def test_a_noisy_load_is_sized_above_its_forecast_by_the_forecasts_error():
    steady, noisy = Planner(CONFIG, linear_model()), Planner(CONFIG, linear_model())
    for i in range(12):
        calm = steady.step(seen(10.0, 4, 4))
        rough = noisy.step(seen(8.0 if i % 2 else 12.0, 4, 4))
    assert calm.forecast_rate == pytest.approx(10.0)
    assert rough.forecast_rate > 12.0
