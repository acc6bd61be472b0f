"""Next-interval load forecasts (request rate, lengths) and the pick among them by error.

Three forecasters: the last value, Holt's damped linear trend, and Holt-Winters with an
additive season (statsmodels fits both). `Picker` scores each by its own one-step errors
over recent intervals and answers with the best, so a steady load is met by the last value
and a daily cycle by the seasonal model without anyone choosing.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

#: Intervals of history kept (and fitted): bounded whatever the run's length.
HISTORY = 2048


class Constant:
    name = "constant"

    def predict(self, history: Sequence[float], ahead: int = 1) -> float:
        return float(history[-1])


class Smoothing:
    """Holt's linear trend, damped; the last value until there are 6 intervals."""

    name = "smoothing"

    def predict(self, history: Sequence[float], ahead: int = 1) -> float:
        if len(history) < 6:
            return float(history[-1])
        from statsmodels.tsa.holtwinters import Holt

        series = np.asarray(history, dtype=np.float64)
        with quiet():
            fit = Holt(series, damped_trend=True, initialization_method="estimated").fit()
            return float(fit.forecast(ahead)[-1])


class Seasonal:
    """Holt-Winters with an additive season of `period` intervals; the value one period
    back until two whole periods are known."""

    name = "seasonal"

    def __init__(self, period: int) -> None:
        if period < 2:
            raise ValueError(f"a season of {period} intervals")
        self.period = period

    def predict(self, history: Sequence[float], ahead: int = 1) -> float:
        if len(history) < 2 * self.period:
            back = self.period - (ahead - 1) % self.period  # the same phase, a period ago
            return float(history[-back] if len(history) >= back else history[-1])
        from statsmodels.tsa.holtwinters import ExponentialSmoothing

        series = np.asarray(history, dtype=np.float64)
        with quiet():
            model = ExponentialSmoothing(
                series, trend="add", seasonal="add", seasonal_periods=self.period,
                initialization_method="estimated",
            )  # fmt: skip
            return float(model.fit().forecast(ahead)[-1])


@contextmanager
def quiet() -> Iterator[None]:
    """statsmodels' convergence warnings and numpy's log(0) on a perfect fit, silenced."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


class Picker:
    """Feeds each interval's observation to every forecaster and answers with the one whose
    last `window` one-step forecasts erred least (mean absolute error); never below 0."""

    def __init__(self, forecasters: Sequence, window: int = 12) -> None:
        self.forecasters = list(forecasters)
        self.history: deque[float] = deque(maxlen=HISTORY)
        self.errors = {f.name: deque(maxlen=window) for f in self.forecasters}
        self._pending: dict[str, float] = {}

    def observe(self, value: float) -> None:
        for name, predicted in self._pending.items():
            self.errors[name].append(abs(predicted - value))
        self.history.append(float(value))
        self._pending = {f.name: f.predict(self.history) for f in self.forecasters}

    @property
    def best(self) -> str:
        scored = [(float(np.mean(e)) if e else float("inf"), i, name)
                  for i, (name, e) in enumerate(self.errors.items())]  # fmt: skip
        return min(scored)[2]

    def error(self) -> float:
        """The best forecaster's mean absolute one-step error (0 before it has one)."""
        errors = self.errors[self.best]
        return float(np.mean(errors)) if errors else 0.0

    def forecast(self, ahead: int = 1) -> float | None:
        """The value `ahead` intervals on, by the forecaster with the best one-step record;
        None before any observation."""
        if not self._pending:
            return None
        if ahead == 1:
            return max(0.0, self._pending[self.best])
        best = next(f for f in self.forecasters if f.name == self.best)
        return max(0.0, best.predict(self.history, ahead))
