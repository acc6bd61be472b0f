"""When to split a request over a prefill and a decode worker, and the counts of what was done.

Disaggregation pays when the prompt's uncached part is long: its prefill then stalls no
decode batch, and the transfer costs less than the compute it moves. It does not pay for a
short uncached part (a chat turn whose history the decode worker already holds), nor when
the prefill pool is saturated while decode workers have room. Those are prefilled locally on
the decode worker, as in aggregated serving.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from tandem.protocol import GenerateOutput, GenerateRequest, KvTransferParams
from tandem.router.pool import NoWorkers, WorkerPool

log = logging.getLogger(__name__)

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


async def prefill_then_decode(
    engine: Any, request: GenerateRequest, hashes: list[int] | None
) -> AsyncIterator[GenerateOutput]:
    """Prefill (and first token) on a prefill worker, the rest on a decode worker. `engine`
    is the RemoteEngine: its `stream_from(pool, request, hashes)`, pools, fallback counts and
    `release_export` (of blocks no decode worker will take)."""
    params: KvTransferParams | None = None
    handed_over = False
    export = msgspec.structs.replace(request, kv_export=True)
    try:
        try:
            async for out in engine.stream_from(engine.prefill, export, hashes):
                if out.kv_transfer is not None:
                    params, out.kv_transfer = out.kv_transfer, None
                    if params.connector is not None and not out.token_ids:
                        continue  # a vLLM hand-over: the decode worker sends every token
                yield out
        except NoWorkers as exc:
            if params is not None:
                raise
            engine.fallbacks["prefill_unavailable"] += 1
            log.warning("request %s: %s; prefilling on a decode worker", request.request_id, exc)
            async for out in engine.stream_from(engine.pool, request, hashes):
                yield out
            return
        if params is None:  # finished with its first token: nothing to decode
            return
        imported = msgspec.structs.replace(request, kv_import=params)
        async for out in engine.stream_from(engine.pool, imported, hashes):
            handed_over = True  # the decode worker pulls and releases from now on
            yield out
    finally:
        # An engine's own connector (vLLM's) frees unclaimed blocks on its own deadline.
        if params is not None and params.connector is None and not handed_over:
            engine.release_export(params)
