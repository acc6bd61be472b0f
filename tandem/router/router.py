"""`Router`: picks the worker for each request, from KV overlap and load (DESIGN.md, router).

It holds no connections: whoever feeds it (`RouterFeed` for KV events and snapshots, the
worker pool for membership and published load) calls its methods, and the frontend asks it
`select()` per request and reports the request's progress (`first_token`, `finish`), which
books the load the router itself caused until the workers' published figures catch up.

Policies:
* `kv` - lowest cost(w) = prefill_blocks(w) + n - credit * cached(w) + decode_blocks(w), with
  cached blocks weighted by tier (DESIGN.md's baseline); temperature 0 takes the minimum,
  above 0 samples with p ∝ exp(-(c - c_min) / ((c_max - c_min) * T)).
* `round_robin`, `random`, `least_loaded` (lowest prefill + decode blocks).

The kv cost is in blocks (above) or, with `cost="seconds"`, an estimate of the time to first
token: the same blocks of prefill at the worker's published prefill rate, plus each host or
disk hit at its tier's published load rate (never dearer than recomputing the block, which
the engine then does). Until a worker has published its rates the estimate uses the others'
(or a default) and the tier weights, i.e. the block cost times one block's prefill time.

No pile-ups: a worker's advantage from cached blocks is at most the request's own size, and
its bookings count at once, so a burst that shares one system prompt spreads as soon as the
cached worker's queue outweighs the prompt. Workers whose KV cache is nearly full
(`busy_kv_usage`) are skipped while any other worker has room.

Ties break by a hash of the request and the worker: deterministic, so frontend replicas fed
the same events choose alike, yet spread over workers.
"""

from __future__ import annotations

import bisect
import math
import random
import time
from collections.abc import Iterable, Sequence
from typing import Literal

import msgspec
import xxhash

from tandem.protocol import KvEvent, LoadStats
from tandem.protocol.events import Tier
from tandem.protocol.hashing import block_hashes, iter_sequence_hashes, local_hash
from tandem.router.index import DISK_DISCOUNT, HOST_DISCOUNT, KvIndex

Policy = Literal["kv", "round_robin", "random", "least_loaded"]
POLICIES: tuple[Policy, ...] = ("kv", "round_robin", "random", "least_loaded")
Cost = Literal["blocks", "seconds"]
COSTS: tuple[Cost, ...] = ("blocks", "seconds")
#: Prompt tokens per second assumed for workers before any has published its rate.
DEFAULT_PREFILL_TOKENS_PER_S = 10_000.0
#: Upper bounds (seconds) of the decision-time histogram.
DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2)


class WorkerScore(msgspec.Struct, kw_only=True):
    """Why a worker got the cost it got: what `overlap_scores` shows for debugging."""

    worker_id: str
    overlap_blocks: int
    cached_blocks: float  # tier-weighted
    prefill_blocks: float
    decode_blocks: float
    cost: float


class Decision(msgspec.Struct, kw_only=True):
    worker_id: str
    overlap_blocks: int
    request_blocks: int
    cost: float
    policy: str


class _Booking:
    __slots__ = ("blocks", "prefill_tokens", "worker_id")

    def __init__(self, worker_id: str, prefill_tokens: int, blocks: int) -> None:
        self.worker_id = worker_id
        self.prefill_tokens = prefill_tokens
        self.blocks = blocks


class Router:
    def __init__(
        self,
        block_size: int,
        policy: Policy = "kv",
        *,
        cost: Cost = "blocks",
        credit: float = 1.0,
        decode_weight: float = 1.0,
        temperature: float = 0.0,
        busy_kv_usage: float = 0.95,
        approx_ttl: float | None = None,
        seed: int | None = None,
        max_blocks_per_worker: int = 1 << 20,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown router policy {policy!r}; choose from {POLICIES}")
        if cost not in COSTS:
            raise ValueError(f"unknown router cost {cost!r}; choose from {COSTS}")
        self.block_size = block_size
        self.policy = policy
        self.cost = cost
        self.credit = credit
        self.decode_weight = decode_weight
        self.temperature = temperature
        self.busy_kv_usage = busy_kv_usage
        self.approx_ttl = approx_ttl  # not None: approximate mode, no KV events expected
        self.index = KvIndex(max_blocks_per_worker)
        self._rng = random.Random(seed)
        self._next = 0
        self._loads: dict[str, LoadStats] = {}
        self._booked_prefill: dict[str, int] = {}  # worker -> tokens
        self._booked_blocks: dict[str, int] = {}  # worker -> blocks
        self._bookings: dict[str, _Booking] = {}
        # Released by us since the worker last published: its figures still count them.
        self._released_prefill: dict[str, int] = {}
        self._released_blocks: dict[str, int] = {}
        self.decisions = 0
        self.hit_blocks = 0
        self.request_blocks = 0
        # Decision durations as histogram counts: constant memory whether or not anyone scrapes.
        self.decision_counts = [0] * (len(DECISION_BUCKETS) + 1)
        self.decision_seconds_sum = 0.0

    # -- feeding -------------------------------------------------------------------------

    def add_worker(self, worker_id: str) -> None:
        self.index.add_worker(worker_id)

    def remove_worker(self, worker_id: str) -> None:
        self.index.remove_worker(worker_id)
        self._loads.pop(worker_id, None)
        for figures in (
            self._booked_prefill,
            self._booked_blocks,
            self._released_prefill,
            self._released_blocks,
        ):
            figures.pop(worker_id, None)
        for rid in [r for r, b in self._bookings.items() if b.worker_id == worker_id]:
            del self._bookings[rid]

    def apply_events(self, worker_id: str, events: Sequence[KvEvent]) -> bool:
        """False: events were lost; fetch a snapshot and call `apply_snapshot`."""
        return self.index.apply(worker_id, events)

    def apply_snapshot(
        self, worker_id: str, last_event_id: int, blocks: dict[Tier, list[int]]
    ) -> None:
        self.index.replace(worker_id, last_event_id, blocks)

    def update_load(self, worker_id: str, stats: LoadStats) -> None:
        self._loads[worker_id] = stats
        self._released_prefill.pop(worker_id, None)
        self._released_blocks.pop(worker_id, None)

    # -- selection -----------------------------------------------------------------------

    def hashes(self, token_ids: Sequence[int], lora_name: str | None = None) -> list[int]:
        return block_hashes(token_ids, self.block_size, lora_name)[1]

    def scores(
        self,
        token_ids: Sequence[int],
        workers: Sequence[str],
        lora_name: str | None = None,
        hashes: Sequence[int] | None = None,
    ) -> list[WorkerScore]:
        """The kv policy's view of every worker in `workers`. `hashes`: the prompt's sequence
        hashes, if the caller has them already."""
        if hashes is None:
            hashes = self.hashes(token_ids, lora_name)
        return self._scores(hashes, len(token_ids), workers)

    def select(
        self,
        token_ids: Sequence[int],
        workers: Sequence[str],
        *,
        lora_name: str | None = None,
        request_id: str | None = None,
        hashes: Sequence[int] | None = None,
    ) -> Decision:
        """Pick one of `workers` (non-empty) for a prompt; with `request_id`, book its load on
        the chosen worker until `finish(request_id)`. `hashes`: the prompt's sequence hashes,
        if the caller has them already (otherwise they are computed only as far as needed)."""
        if not workers:
            raise ValueError("no workers to choose from")
        start = time.perf_counter()
        prompt_hashes: Iterable[int] = ()
        if hashes is not None:
            prompt_hashes = hashes
        elif self.approx_ttl is not None:
            prompt_hashes = self.hashes(token_ids, lora_name)  # all of them, to predict
        elif self.policy == "kv":
            prompt_hashes = iter_sequence_hashes(token_ids, self.block_size, lora_name)
        if self.approx_ttl is not None:
            self.index.expire()
        if self.policy == "kv":
            scores = self._scores(prompt_hashes, len(token_ids), self._with_room(workers))
            # Tie-break seed: the prompt's tail, so that prompts differ in it.
            best = self._pick(scores, local_hash(token_ids[-4 * self.block_size :]))
            worker_id, overlap, cost = best.worker_id, best.overlap_blocks, best.cost
        else:
            worker_id = self._pick_simple(workers)
            overlap = 0
            cost = self._prefill_blocks(worker_id) + self._decode_blocks(worker_id)
        n_blocks = -(-len(token_ids) // self.block_size)
        if request_id is not None:
            uncached = max(0, len(token_ids) - overlap * self.block_size)
            self._book(request_id, worker_id, uncached, n_blocks)
        if self.approx_ttl is not None:
            self.index.predict(worker_id, list(prompt_hashes), self.approx_ttl)
        self.decisions += 1
        self.hit_blocks += overlap
        self.request_blocks += len(token_ids) // self.block_size
        elapsed = time.perf_counter() - start
        self.decision_counts[bisect.bisect_left(DECISION_BUCKETS, elapsed)] += 1
        self.decision_seconds_sum += elapsed
        return Decision(
            worker_id=worker_id,
            overlap_blocks=overlap,
            request_blocks=n_blocks,
            cost=cost,
            policy=self.policy,
        )

    def first_token(self, request_id: str) -> None:
        """The request's prefill is done: its queued prefill tokens leave the booking."""
        booking = self._bookings.get(request_id)
        if booking is not None and booking.prefill_tokens:
            w = booking.worker_id
            self._booked_prefill[w] -= booking.prefill_tokens
            self._released_prefill[w] = self._released_prefill.get(w, 0) + booking.prefill_tokens
            booking.prefill_tokens = 0

    def finish(self, request_id: str) -> None:
        """The request ended (any way): release everything booked for it."""
        self.first_token(request_id)
        booking = self._bookings.pop(request_id, None)
        if booking is not None:
            w = booking.worker_id
            self._booked_blocks[w] -= booking.blocks
            self._released_blocks[w] = self._released_blocks.get(w, 0) + booking.blocks

    # -- internals -----------------------------------------------------------------------

    def _book(self, request_id: str, worker_id: str, prefill_tokens: int, blocks: int) -> None:
        self.finish(request_id)  # a retry on another worker replaces the old booking
        self._bookings[request_id] = _Booking(worker_id, prefill_tokens, blocks)
        self._booked_prefill[worker_id] = self._booked_prefill.get(worker_id, 0) + prefill_tokens
        self._booked_blocks[worker_id] = self._booked_blocks.get(worker_id, 0) + blocks

    def _prefill_blocks(self, worker_id: str) -> float:
        """Queued prefill in blocks: the worker's own figure (less what we released since it
        was published) or our bookings, whichever is larger. Bookings count at once;
        published figures include other routers' work."""
        load = self._loads.get(worker_id)
        published = load.queued_prefill_tokens if load else 0
        published -= self._released_prefill.get(worker_id, 0)
        return max(published, self._booked_prefill.get(worker_id, 0)) / self.block_size

    def _decode_blocks(self, worker_id: str) -> float:
        """Active KV blocks, on the same terms as `_prefill_blocks`."""
        load = self._loads.get(worker_id)
        published = load.active_blocks if load else 0
        published -= self._released_blocks.get(worker_id, 0)
        return float(max(published, self._booked_blocks.get(worker_id, 0)))

    def _with_room(self, workers: Sequence[str]) -> Sequence[str]:
        roomy = [
            w
            for w in workers
            if (load := self._loads.get(w)) is None or load.kv_usage < self.busy_kv_usage
        ]
        return roomy or workers

    def _scores(
        self, hashes: Iterable[int], num_tokens: int, workers: Sequence[str]
    ) -> list[WorkerScore]:
        n = -(-num_tokens // self.block_size)
        overlap = self.index.overlap(hashes)
        fallback_rate = self._fallback_rate(workers) if self.cost == "seconds" else 0.0
        scores = []
        for w in workers:
            held = overlap.blocks.get(w, 0)
            cached = overlap.weighted.get(w, 0.0)
            prefill = self._prefill_blocks(w)
            decode = self._decode_blocks(w)
            if self.cost == "blocks":
                cost = prefill + n - self.credit * cached + self.decode_weight * decode
            else:
                blocks = prefill + n - self.credit * held + self.decode_weight * decode
                cost = self._seconds(w, blocks, overlap.lower.get(w), fallback_rate)
            scores.append(
                WorkerScore(
                    worker_id=w,
                    overlap_blocks=held,
                    cached_blocks=cached,
                    prefill_blocks=prefill,
                    decode_blocks=decode,
                    cost=cost,
                )
            )
        return scores

    def _fallback_rate(self, workers: Sequence[str]) -> float:
        """The prefill rate of a worker that has published none: the others' mean."""
        rates = [load.prefill_tokens_per_s for w in workers
                 if (load := self._loads.get(w)) is not None and load.prefill_tokens_per_s > 0]
        return sum(rates) / len(rates) if rates else DEFAULT_PREFILL_TOKENS_PER_S  # fmt: skip

    def _seconds(
        self, worker_id: str, blocks: float, lower: tuple[int, int] | None, fallback: float
    ) -> float:
        """`blocks` of prefill at the worker's rate, plus its (host, disk) hits' loads."""
        load = self._loads.get(worker_id)
        rate = load.prefill_tokens_per_s if load and load.prefill_tokens_per_s > 0 else fallback
        block_s = self.block_size / rate
        seconds = blocks * block_s
        if lower is not None:
            host_rate = load.host_blocks_per_s if load else 0.0
            disk_rate = load.disk_blocks_per_s if load else 0.0
            host_s = min(block_s, 1 / host_rate) if host_rate > 0 else HOST_DISCOUNT * block_s
            disk_s = min(block_s, 1 / disk_rate) if disk_rate > 0 else DISK_DISCOUNT * block_s
            seconds += self.credit * (lower[0] * host_s + lower[1] * disk_s)
        return seconds

    def _pick(self, scores: list[WorkerScore], key: int) -> WorkerScore:
        lo = min(s.cost for s in scores)
        hi = max(s.cost for s in scores)
        if self.temperature > 0 and hi > lo:
            weights = [math.exp(-(s.cost - lo) / ((hi - lo) * self.temperature)) for s in scores]
            return self._rng.choices(scores, weights)[0]
        best = [s for s in scores if s.cost == lo]
        return min(best, key=lambda s: xxhash.xxh3_64_intdigest(s.worker_id.encode(), seed=key))

    def _pick_simple(self, workers: Sequence[str]) -> str:
        if self.policy == "round_robin":
            self._next += 1
            return workers[self._next % len(workers)]
        if self.policy == "random":
            return self._rng.choice(list(workers))
        return min(workers, key=lambda w: self._prefill_blocks(w) + self._decode_blocks(w))
