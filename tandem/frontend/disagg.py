"""When to split a request over a prefill and a decode worker, and the counts of what was done.

Disaggregation pays when the prompt's uncached part is long: its prefill then stalls no
decode batch, and the transfer costs less than the compute it moves. It does not pay for a
short uncached part (a chat turn whose history the decode worker already holds), nor when
the prefill pool is saturated while decode workers have room. Those are prefilled locally on
the decode worker, as in aggregated serving.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from tandem.protocol import GenerateRequest
from tandem.router.pool import WorkerPool

#: Decode workers above this KV usage have no room to prefill for a busy prefill pool.
DECODE_ROOM_USAGE = 0.8


@dataclass
class DisaggConfig:
    """`max_local_prefill_length`: prefill locally when at most this many prompt tokens are
    uncached on the best decode worker. `max_prefill_queue_tokens`: a prefill worker with
    this many prompt tokens queued counts as saturated."""

    max_local_prefill_length: int = 512
    max_prefill_queue_tokens: int = 16384


class Plan(NamedTuple):
    """`path`: "remote", or local_<why>. `hashes`: the prompt's block hashes if the plan
    needed them (both routers then reuse them instead of hashing the prompt again)."""

    path: str
    hashes: list[int] | None = None


class DisaggPlanner:
    def __init__(self, prefill: WorkerPool, decode: WorkerPool, config: DisaggConfig) -> None:
        self.prefill = prefill
        self.decode = decode
        self.config = config
        self.counts: Counter[str] = Counter()  # path: remote, or local_<why>

    def plan(self, request: GenerateRequest) -> Plan:
        """Where to prefill `request`: "remote", or why on its decode worker."""
        plan = self._plan(request)
        self.counts[plan.path] += 1
        return plan

    def _plan(self, request: GenerateRequest) -> Plan:
        if not self.prefill.workers:
            return Plan("local_no_prefill_workers")
        if request.sampling.n != 1:
            return Plan("local_n")
        router, prompt = self.decode.router, request.prompt_token_ids
        if router is None or not self.decode.workers:
            return Plan("remote")
        hashes = router.hashes(prompt, request.lora_name)
        scores = router.scores(prompt, list(self.decode.workers), hashes=hashes)
        best = max(s.overlap_blocks for s in scores)
        if len(prompt) - best * router.block_size <= self.config.max_local_prefill_length:
            return Plan("local_short", hashes)
        if self._prefill_saturated() and self._decode_has_room():
            return Plan("local_prefill_busy", hashes)
        return Plan("remote", hashes)

    def _prefill_saturated(self) -> bool:
        limit = self.config.max_prefill_queue_tokens
        return all(
            w.stats is not None and w.stats.queued_prefill_tokens >= limit
            for w in self.prefill.workers.values()
        )

    def _decode_has_room(self) -> bool:
        return any(
            w.stats is None or w.stats.kv_usage < DECODE_ROOM_USAGE
            for w in self.decode.workers.values()
        )


class DisaggCollector(Collector):
    def __init__(self, planner: DisaggPlanner, fallbacks: Counter[str]) -> None:
        self._planner = planner
        self._fallbacks = fallbacks

    def collect(self) -> Iterator[Metric]:
        paths = CounterMetricFamily(
            "tandem_disagg_requests",
            "Requests by path: remote (prefill worker, then KV transfer to a decode worker) or"
            " local_<reason> (prefilled on the decode worker).",
            labels=["path"],
        )
        for path, n in sorted(self._planner.counts.items()):
            paths.add_metric([path], n)
        yield paths
        fallbacks = CounterMetricFamily(
            "tandem_disagg_fallbacks",
            "Disaggregated requests that the frontend moved to local prefill, by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(self._fallbacks.items()):
            fallbacks.add_metric([reason], n)
        yield fallbacks
