"""An engine without a model: the real scheduler and block manager, step times from a model.

Batching, prefix caching, preemption and KV events are the real engine's code; only the
forward pass is replaced by a sleep whose length a performance model predicts, and sampled
tokens are synthetic. That lets a laptop run a fleet of workers for routing and planning tests.
"""

from tandem.engine.mock.perf_model import (
    PerfModel,
    PolynomialPerfModel,
    ProfilePerfModel,
    load_perf_model,
)
from tandem.engine.mock.runner import MockRunner

__all__ = [
    "MockRunner",
    "PerfModel",
    "PolynomialPerfModel",
    "ProfilePerfModel",
    "load_perf_model",
]
