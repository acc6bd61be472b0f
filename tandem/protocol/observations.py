"""What the planner observes: engine steps from the workers, finished requests from the
frontends, each published on the event plane as it happens (batched per publish)."""

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


def steps_subject(namespace: str, worker_id: str = "*") -> str:
    """Subject of a worker's step reports (`*`: every worker's)."""
    return f"{namespace}.steps.{worker_id}"


def requests_subject(namespace: str, frontend_id: str = "*") -> str:
    """Subject of a frontend's finished-request reports (`*`: every frontend's)."""
    return f"{namespace}.requests.{frontend_id}"
