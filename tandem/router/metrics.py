"""Prometheus view of a `WorkerPool`'s router, read at scrape time (the hot path only counts)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tandem.router.pool import WorkerPool
from tandem.router.router import DECISION_BUCKETS

PREFIX = "tandem_router"


class RouterCollector(Collector):
    """`prefix` tells apart the pools of one frontend (decode and prefill)."""

    def __init__(self, pool: WorkerPool, prefix: str = PREFIX) -> None:
        self._pool = pool
        self._prefix = prefix

    def collect(self) -> Iterator[Metric]:
        router, p = self._pool.router, self._prefix
        if router is None:
            return
        bounds = (*map(str, DECISION_BUCKETS), "+Inf")
        yield HistogramMetricFamily(
            f"{p}_decision_seconds",
            "Time to choose a worker for a request.",
            buckets=list(zip(bounds, itertools.accumulate(router.decision_counts), strict=True)),
            sum_value=router.decision_seconds_sum,
        )
        decisions = CounterMetricFamily(
            f"{p}_decisions", "Routing decisions by policy.", labels=["policy"]
        )
        decisions.add_metric([router.policy], router.decisions)
        yield decisions
        yield CounterMetricFamily(
            f"{p}_request_blocks",
            "Full prompt blocks of routed requests.",
            router.request_blocks,
        )
        yield CounterMetricFamily(
            f"{p}_overlap_blocks",
            "Of those, blocks the chosen worker already held.",
            router.hit_blocks,
        )
        yield GaugeMetricFamily(
            f"{p}_overlap_ratio",
            "Overlap blocks over request blocks since start (the router's prefix hit rate).",
            router.hit_blocks / router.request_blocks if router.request_blocks else 0.0,
        )
        yield GaugeMetricFamily(
            f"{p}_index_blocks", "Block entries in the KV index.", router.index.num_blocks()
        )
        yield GaugeMetricFamily(
            f"{p}_index_bytes",
            "Approximate memory of the KV index.",
            router.index.approx_bytes(),
        )
        yield CounterMetricFamily(
            f"{p}_snapshots", "KV snapshots fetched after event gaps.", self._pool.snapshots
        )
        load = GaugeMetricFamily(
            f"{p}_worker_load_blocks",
            "Per worker: queued prefill and active decode KV blocks, as the router sees them.",
            labels=["worker", "kind"],
        )
        for score in router.scores([], list(self._pool.workers)):
            load.add_metric([score.worker_id, "prefill"], score.prefill_blocks)
            load.add_metric([score.worker_id, "decode"], score.decode_blocks)
        yield load
