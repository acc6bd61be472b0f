"""How many prefill and decode workers a forecast load needs to meet TTFT and ITL targets.

From the distribution of lengths, not only their means:

- prefill: each worker is an M/G/1 queue of prompts (Pollaczek-Khinchine): at `rate / n`
  arrivals a second and service times S = prefill_s(prompt tokens), the mean wait is
  λ E[S²] / (2 (1 - ρ)) with ρ = λ E[S]. A pool of n meets the target when that wait plus
  the `quantile` of S is within it. Batching prefills serves faster than one at a time, so
  this errs towards more workers.
- decode: a worker of a pool of n streams rate · E[output] / n tokens a second. By Little's
  law it then decodes a batch of that rate times its step time, and the step time grows with
  the batch: the step it settles at is the fixed point s = step(r·s) (over the batch's mean
  context), found by iteration; none while it runs away (the worker cannot keep up). The
  batch's size is Poisson around that mean, so n meets the target when a step of its p90
  batch is within the ITL target and that batch's KV fits the worker's cache. Workers that
  also prefill (an aggregated pool) spend a share of their time on prompts, rate / n ·
  E[prefill time]; their decode steps stretch by it.

Each answer is the smallest n that meets its target within the pool's bounds (the upper
bound when none does); None when the step model cannot predict yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tandem.planner.step_model import StepModel

#: The standard normal's 90th percentile: the targets are p90s.
Z90 = 1.2816


@dataclass(frozen=True)
class PoolBounds:
    min_replicas: int = 1
    max_replicas: int = 8

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"replica bounds {self.min_replicas}..{self.max_replicas}")


def prefill_replicas(
    model: StepModel,
    rate: float,
    prompt_tokens: Sequence[int],
    ttft_s: float,
    bounds: PoolBounds,
    quantile: float = 0.9,
) -> int | None:
    """Workers for `rate` requests a second of `prompt_tokens` (a sample of uncached prompt
    lengths) within a TTFT target of `ttft_s`."""
    if rate <= 0 or not prompt_tokens:
        return bounds.min_replicas
    service = [model.prefill_s(n) for n in prompt_tokens]
    if any(s is None for s in service):
        return None
    s = np.array(service, dtype=np.float64)
    mean, second, tail = s.mean(), (s**2).mean(), float(np.quantile(s, quantile))
    for n in range(max(bounds.min_replicas, 1), bounds.max_replicas + 1):
        arrivals = rate / n
        busy = arrivals * mean
        if busy < 1 and arrivals * second / (2 * (1 - busy)) + tail <= ttft_s:
            return n
    return bounds.max_replicas


def decode_replicas(
    model: StepModel,
    rate: float,
    prompt_tokens: Sequence[int],
    output_tokens: Sequence[int],
    itl_s: float,
    kv_tokens_per_worker: int,
    bounds: PoolBounds,
    prefills_too: bool = False,
    step_gap_s: float = 0.0,
    rate_sd: float = 0.0,
) -> int | None:
    """Workers for `rate` requests a second with these prompt and output lengths (samples)
    within an inter-token latency target of `itl_s`. `prefills_too`: the workers compute
    their prompts as well (an aggregated pool): the share of time that takes stretches
    every decode step. `step_gap_s`: what a token takes beyond its step (learned).
    `rate_sd`: the rate's own uncertainty (the forecast's error), whose spread of the batch
    adds to the Poisson one's: the p90 of the sum, not a p90 on top of a p90."""
    if rate <= 0 or not output_tokens:
        return bounds.min_replicas
    mean_in = float(np.mean(prompt_tokens)) if prompt_tokens else 0.0
    mean_out = float(np.mean(output_tokens))
    context = mean_in + mean_out / 2  # a sequence's KV halfway through its answer
    for n in range(max(bounds.min_replicas, 1), bounds.max_replicas + 1):
        step_of = _step_of(model, rate / n, prompt_tokens, prefills_too, step_gap_s)
        if step_of is None:
            return None
        step = _settled_step(step_of, rate * mean_out / n, context, itl_s)
        if step is None:
            continue
        batch = rate * mean_out / n * step
        spread = rate_sd * mean_out / n * step
        busy = batch + Z90 * math.sqrt(batch + spread**2)  # the batch's p90 (Poisson + rate)
        if (step_of(busy, busy * context) or math.inf) <= itl_s and (
            busy * (mean_in + mean_out) <= kv_tokens_per_worker
        ):
            return n
    return bounds.max_replicas


def settled_step(
    model: StepModel,
    rate: float,
    prompt_tokens: Sequence[int],
    output_tokens: Sequence[int],
    itl_s: float,
    prefills_too: bool = False,
) -> float | None:
    """The step one worker taking `rate` requests a second settles at (None: unknown, or
    past what it can serve)."""
    if rate <= 0 or not output_tokens:
        return None
    mean_in = float(np.mean(prompt_tokens)) if prompt_tokens else 0.0
    mean_out = float(np.mean(output_tokens))
    step_of = _step_of(model, rate, prompt_tokens, prefills_too, 0.0)
    if step_of is None:
        return None
    return _settled_step(step_of, rate * mean_out, mean_in + mean_out / 2, itl_s)


def _step_of(
    model: StepModel,
    rate: float,
    prompt_tokens: Sequence[int],
    prefills_too: bool,
    step_gap_s: float,
) -> Callable[[float, float], float | None] | None:
    """Seconds between a sequence's tokens at a batch and its KV tokens, on a worker taking
    `rate` requests a second: the decode step, stretched by the time its prompts take when
    it prefills them too, plus the gap; None when the model cannot tell (or the prompts
    alone fill the worker's time: infinite)."""
    if model.decode_s(1, 1) is None:
        return None
    free = 1.0  # of the worker's time, what the prompts leave to decoding
    if prefills_too and prompt_tokens:
        times = [model.prefill_s(n) for n in prompt_tokens]
        if any(t is None for t in times):
            return None
        free = 1 - rate * float(np.mean(times))  # type: ignore[arg-type]

    def step_of(batch: float, kv: float) -> float | None:
        seconds = model.decode_s(batch, kv)
        if seconds is None or free <= 0:
            return None if seconds is None else math.inf
        return seconds / free + step_gap_s

    return step_of


def _settled_step(
    step_of: Callable[[float, float], float | None],
    tokens_per_s: float,
    context: float,
    itl_s: float,
) -> float | None:
    """The step time s = step_of(r·s) a worker decoding `tokens_per_s` settles at; None
    when the model cannot tell or the steps grow without bound (past 1,000x the target)."""
    step = step_of(1, context)
    for _ in range(200):
        if step is None or step > 1e3 * itl_s:
            return None
        batch = tokens_per_s * step
        settled = step_of(batch, batch * context)
        if settled is None or abs(settled - step) <= 1e-9 + 1e-6 * step:
            return settled
        step = settled
    return None  # not converging: too close to the worker's capacity to count on
