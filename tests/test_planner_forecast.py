"""Load forecasts on synthetic series: each forecaster where it should win, and the pick by
measured error."""

from __future__ import annotations

import math

import pytest

from tandem.planner.forecast import Constant, Picker, Seasonal, Smoothing

PERIOD = 8


def run(series) -> Picker:
    picker = Picker([Constant(), Smoothing(), Seasonal(PERIOD)])
    for value in series:
        picker.observe(value)
    return picker


def mean_error(picker: Picker, name: str) -> float:
    errors = picker.errors[name]
    return sum(errors) / len(errors)


def test_a_flat_load_is_forecast_as_it_is():
    picker = run([50.0] * 30)
    assert picker.forecast() == pytest.approx(50.0, abs=1e-6)
    assert mean_error(picker, "constant") == 0.0


def test_a_ramp_is_followed_by_the_trend_models_not_the_last_value():
    picker = run([10.0 + 2.0 * i for i in range(30)])
    assert picker.best != "constant"
    assert mean_error(picker, "smoothing") < 0.25 * mean_error(picker, "constant")
    assert picker.forecast() == pytest.approx(70.0, rel=0.02)
    # Three intervals on (a worker asked for now serves then): the ramp goes on.
    assert picker.forecast(3) == pytest.approx(74.0, rel=0.02)


def test_a_cycle_is_forecast_by_the_seasonal_model():
    def load(i: int) -> float:
        return 100.0 + 50.0 * math.sin(2 * math.pi * i / PERIOD)

    picker = run([load(i) for i in range(5 * PERIOD)])
    assert picker.best == "seasonal"
    assert mean_error(picker, "seasonal") < 0.2 * mean_error(picker, "smoothing")
    assert picker.forecast() == pytest.approx(load(5 * PERIOD), abs=2.0)
    assert picker.forecast(3) == pytest.approx(load(5 * PERIOD + 2), abs=2.0)


def test_forecasts_start_with_the_first_observation_and_never_go_negative():
    picker = Picker([Constant(), Smoothing()])
    assert picker.forecast() is None
    for value in (40.0, 30.0, 20.0, 10.0, 1.0, 0.0, 0.0):
        picker.observe(value)
    assert picker.forecast() >= 0.0
    with pytest.raises(ValueError, match="season"):
        Seasonal(1)
