"""What the planner observes: engine steps from the workers, finished requests from the
frontends, each published on the event plane as it happens (batched per publish); and what
it decided, for every frontend to export."""

from __future__ import annotations

import msgspec


class StepSample(msgspec.Struct, array_like=True, frozen=True):
    """One engine step: the work it did and its wall time."""

    prompt_tokens: int  # prompt tokens computed
    prompt_pairs: int  # (query, key) pairs of those tokens' attention: ~n²/2 for a lone prompt
    decodes: int  # sequences that decoded one token
    context_tokens: int  # KV tokens those decodes read
    seconds: float


class WorkerSteps(msgspec.Struct, kw_only=True):
    """The steps a worker ran since its previous report, oldest first (a bounded sample)."""

    worker_id: str
    role: str
    steps: list[StepSample]


class RequestSample(msgspec.Struct, array_like=True, frozen=True):
    """One finished request, as its client saw it."""

    prompt_tokens: int
    cached_tokens: int  # of the prompt, found in a KV cache
    output_tokens: int
    ttft_s: float | None  # None: no token came
    itl_s: float | None  # mean gap between its tokens; None below two tokens


class FrontendRequests(msgspec.Struct, kw_only=True):
    """Since a frontend's previous report: how many requests arrived, and the ones that
    finished (a bounded sample)."""

    frontend_id: str
    arrived: int
    finished: list[RequestSample]


class PlannerReport(msgspec.Struct, kw_only=True):
    """One planner interval: the load it saw and forecast, the pool sizes it asked for."""

    observed_rate: float  # requests a second over the interval
    forecast_rate: float | None  # what the pools were sized for; None while the model learns
    prefill_replicas: int
    decode_replicas: int  # with `aggregated`, the one pool's
    reasons: list[str] = msgspec.field(default_factory=list)
    aggregated: bool = False  # one pool of workers doing both


def steps_subject(namespace: str, worker_id: str = "*") -> str:
    """Subject of a worker's step reports (`*`: every worker's)."""
    return f"{namespace}.steps.{worker_id}"


def requests_subject(namespace: str, frontend_id: str = "*") -> str:
    """Subject of a frontend's finished-request reports (`*`: every frontend's)."""
    return f"{namespace}.requests.{frontend_id}"


def planner_subject(namespace: str) -> str:
    """Subject of the planner's decisions."""
    return f"{namespace}.planner"
