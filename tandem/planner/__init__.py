"""The SLA planner: sizes the prefill and decode pools to meet TTFT and ITL targets."""

from tandem.planner.replicas import PoolBounds, decode_replicas, prefill_replicas
from tandem.planner.step_model import StepModel

__all__ = ["PoolBounds", "StepModel", "decode_replicas", "prefill_replicas"]
