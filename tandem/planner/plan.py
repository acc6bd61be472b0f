"""One planning decision per interval: observe, forecast, size each pool, correct, bound.

`Planner.step(observation)` turns what the frontends and workers saw in the last interval
into the prefill and decode replica counts for the next one:

1. the request rate is forecast (`Picker`: last value, Holt, Holt-Winters, by error) for
   every interval until a worker asked for now would serve (`lead_intervals`), and the pools
   are sized for the highest with a margin for the forecast's own error (from its measured
   one-step errors): the prefill pool for that rate plus its p90 error, the decode pool for
   the p90 of its batch with the rate's spread added to the batch's own; the lengths are
   the distribution of the recent requests (a bounded sample);
2. each pool is sized from its target (`replicas.py`), on the step model learned from the
   workers' own steps; a decode token also takes the gap the planner learns between steps
   (the interval's median inter-token latency less the step the model predicts at that
   load: the host's own time, KV arriving), smoothed over intervals;
3. a pool whose observed latency missed its target gets one more worker than both the
   calculation and its current size (the reactive correction: the model or the forecast
   was wrong, and waiting for the next forecast would miss the target again), unless
   workers it asked for are still starting (their arrival is the correction under way) or
   came up during the interval (it saw the smaller pool);
4. growing is immediate, shrinking waits until `shrink_after` intervals in a row asked for
   fewer (a restarted planner, or a noisy interval, does not tear down workers) and while
   none of the pool's workers is starting (a fleet coming up has served nothing yet), and the
   total stays within `gpu_budget` (the decode pool keeps the larger share of a cut, since
   its streams are the ones already running).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace

from tandem.planner.forecast import Constant, Picker, Seasonal, Smoothing
from tandem.planner.replicas import (
    Z90,
    PoolBounds,
    decode_replicas,
    prefill_replicas,
    settled_step,
)
from tandem.planner.step_model import StepModel

#: Requests whose lengths are kept as the length distribution.
LENGTH_SAMPLE = 4096
#: The weight of the newest interval in the smoothed step gap.
GAP_WEIGHT = 0.3


@dataclass
class Observation:
    """What one interval saw: its requests, their lengths, latency percentiles and pools."""

    seconds: float
    requests: int
    prompt_tokens: list[int]  # uncached prompt tokens of (a sample of) its requests
    output_tokens: list[int]
    ttft_p90_s: float | None
    itl_p90_s: float | None
    prefill_replicas: int  # asked for: serving or starting
    decode_replicas: int
    prefill_starting: int = 0  # asked for, not serving yet
    decode_starting: int = 0
    itl_p50_s: float | None = None


@dataclass(frozen=True)
class PlannerConfig:
    ttft_s: float
    itl_s: float
    prefill: PoolBounds = field(default_factory=PoolBounds)
    decode: PoolBounds = field(default_factory=PoolBounds)
    gpu_budget: int = 16
    kv_tokens_per_worker: int = 1 << 20
    season_intervals: int = 0  # 0: no seasonal forecaster
    shrink_after: int = 3
    lead_intervals: int = 1  # intervals a new worker takes to serve (its start-up, rounded up)


@dataclass
class Decision:
    prefill_replicas: int
    decode_replicas: int
    forecast_rate: float | None
    reasons: list[str] = field(default_factory=list)


class Planner:
    """`model` learns the prefill pool's steps, `decode_model` the decode pool's (the same
    model by default: one pool's workers do both). A config whose prefill pool may have no
    worker (`prefill=PoolBounds(0, 0)`) plans one aggregated pool, counted as the decode
    pool: its workers prefill too, and it grows for either target."""

    def __init__(
        self, config: PlannerConfig, model: StepModel, decode_model: StepModel | None = None
    ) -> None:
        self.config = config
        self.model = model
        self.decode_model = decode_model or model
        forecasters = [Constant(), Smoothing()]
        if config.season_intervals:
            forecasters.append(Seasonal(config.season_intervals))
        self.rate = Picker(forecasters)
        self.prompts: deque[int] = deque(maxlen=LENGTH_SAMPLE)
        self.outputs: deque[int] = deque(maxlen=LENGTH_SAMPLE)
        self._lower_streak = {"prefill": 0, "decode": 0}
        self._starting = (0, 0)  # the last interval's starting workers, per pool
        self.step_gap_s = 0.0  # learned: see _learn_step_gap

    def plan_ahead(self, startup_s: float, interval_s: float) -> None:
        """Size for the load as far ahead as a new worker takes to serve (measured)."""
        lead = max(1, math.ceil(startup_s / interval_s))
        if lead != self.config.lead_intervals:
            self.config = replace(self.config, lead_intervals=lead)

    def step(self, seen: Observation) -> Decision:
        c = self.config
        self.rate.observe(seen.requests / seen.seconds if seen.seconds > 0 else 0.0)
        self.prompts.extend(seen.prompt_tokens)
        self.outputs.extend(seen.output_tokens)
        rate = max(self.rate.forecast(ahead) or 0.0 for ahead in range(1, c.lead_intervals + 1))
        sd = 1.25 * self.rate.error()  # mean absolute error x 1.25: normal errors' sd
        high = rate + Z90 * sd
        decision = Decision(seen.prefill_replicas, seen.decode_replicas, high)
        aggregated = c.prefill.max_replicas == 0
        want_p = prefill_replicas(self.model, high, self.prompts, c.ttft_s,
                                  c.decode if aggregated else c.prefill)  # fmt: skip
        if want_p is None:  # no prefill step seen yet (short prompts stay on the decode
            # workers): the decode workers' prefill steps price a prompt on the same engine
            want_p = prefill_replicas(self.decode_model, high, self.prompts, c.ttft_s, c.prefill)
        self._learn_step_gap(seen, aggregated)
        want_d = decode_replicas(self.decode_model, rate, self.prompts, self.outputs, c.itl_s,
                                 c.kv_tokens_per_worker, c.decode, prefills_too=aggregated,
                                 step_gap_s=self.step_gap_s, rate_sd=sd)  # fmt: skip
        if want_p is None or want_d is None:
            decision.reasons.append("step model not ready: pools held")
            return decision
        if aggregated:  # one pool: as many workers as either target needs
            want_p, want_d = 0, max(want_p, want_d)
        grown_p, grown_d = self._grown(seen)
        ttft_missed = seen.ttft_p90_s is not None and seen.ttft_p90_s > c.ttft_s
        if ttft_missed and aggregated and not grown_d:  # the one pool prefills
            want_d = max(want_d, seen.decode_replicas + 1)
            decision.reasons.append(f"TTFT p90 {seen.ttft_p90_s:.3f} s over target: +1")
        elif ttft_missed and not aggregated and not grown_p:
            want_p = max(want_p, seen.prefill_replicas + 1)
            decision.reasons.append(f"TTFT p90 {seen.ttft_p90_s:.3f} s over target: +1 prefill")
        if seen.itl_p90_s is not None and seen.itl_p90_s > c.itl_s and not grown_d:
            want_d = max(want_d, seen.decode_replicas + 1)
            decision.reasons.append(f"ITL p90 {seen.itl_p90_s:.4f} s over target: +1 decode")
        p = self._settle("prefill", seen.prefill_replicas, min(want_p, c.prefill.max_replicas),
                         seen.prefill_starting)  # fmt: skip
        d = self._settle("decode", seen.decode_replicas, min(want_d, c.decode.max_replicas),
                         seen.decode_starting)  # fmt: skip
        decision.prefill_replicas, decision.decode_replicas = self._within_budget(p, d)
        return decision

    def _learn_step_gap(self, seen: Observation, aggregated: bool) -> None:
        """The time between a sequence's tokens beyond its worker's step (scheduling, the
        host's own work, KV arriving): the interval's median inter-token latency less the
        step the model predicts at that load, smoothed over intervals."""
        serving = seen.decode_replicas - seen.decode_starting
        if seen.itl_p50_s is None or serving < 1 or seen.seconds <= 0 or not self.outputs:
            return
        per_worker = seen.requests / seen.seconds / serving
        predicted = settled_step(self.decode_model, per_worker, self.prompts, self.outputs,
                                 seen.itl_p50_s, aggregated)  # fmt: skip
        if predicted is not None:
            gap = max(0.0, seen.itl_p50_s - predicted)
            self.step_gap_s += GAP_WEIGHT * (gap - self.step_gap_s)

    def _grown(self, seen: Observation) -> tuple[bool, bool]:
        """Per pool: is it larger now than the latencies just seen can tell? Workers are still
        starting, or some came up during the interval (it was served by fewer for a while)."""
        before, self._starting = self._starting, (seen.prefill_starting, seen.decode_starting)
        prefill, decode = (now > 0 or was > now
                           for was, now in zip(before, self._starting, strict=True))  # fmt: skip
        return prefill, decode

    def _settle(self, pool: str, current: int, wanted: int, starting: int) -> int:
        """Grow at once; shrink by one only after `shrink_after` intervals asking for less,
        and none while the pool has workers starting (nothing yet shows what they serve)."""
        if wanted >= current or starting:
            self._lower_streak[pool] = 0
            return max(wanted, current)
        self._lower_streak[pool] += 1
        if self._lower_streak[pool] < self.config.shrink_after:
            return current
        self._lower_streak[pool] = 0
        return current - 1

    def _within_budget(self, p: int, d: int) -> tuple[int, int]:
        c = self.config
        while p + d > c.gpu_budget and (p > c.prefill.min_replicas or d > c.decode.min_replicas):
            if p > c.prefill.min_replicas and (p >= d or d <= c.decode.min_replicas):
                p -= 1
            else:
                d -= 1
        return p, d
