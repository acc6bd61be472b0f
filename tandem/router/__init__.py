"""KV-aware routing: block index, load tracking, cost and policies, and the worker pool."""

from tandem.router.index import KvIndex
from tandem.router.router import COSTS, POLICIES, Decision, Policy, Router, WorkerScore

__all__ = ["COSTS", "POLICIES", "Decision", "KvIndex", "Policy", "Router", "WorkerScore"]
