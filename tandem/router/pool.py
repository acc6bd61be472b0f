"""`WorkerPool`: the live workers of one namespace and the `Router` that chooses among them.

It watches discovery for `<namespace>.backend.generate` instances and keeps the ones whose
model card agrees with the first one seen (model name, block size; others are refused with an
error log line). It follows the workers' published load and KV events on the event plane and
feeds them to the router; when a worker's event ids show a gap (events lost, or this pool
started after the worker), it asks that worker for a snapshot of its blocks over the request
plane, holding the worker's newer events until the snapshot is in.

The frontend's `RemoteEngine` and the standalone `tandem router` both stand on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from tandem.protocol import GenerateRequest, KvSnapshot, LoadStats
from tandem.protocol.worker import (
    DEFAULT_NAMESPACE,
    GENERATE_ENDPOINT,
    KV_SNAPSHOT_ENDPOINT,
    WORKER_COMPONENT,
    KvEventBatch,
    KvSnapshotRequest,
    ModelCard,
    Role,
    WorkerLoad,
    kv_events_subject,
    load_subject,
)
from tandem.router.router import Decision, Policy, Router
from tandem.runtime import Discovery, EventPlane, InstanceInfo, RequestClient

log = logging.getLogger(__name__)

#: How long a worker that refused a connection is skipped (unless nothing else is left).
SUSPECT_SECONDS = 5.0
SNAPSHOT_TIMEOUT = 5.0
_STAT_FIELDS = tuple(LoadStats.__struct_fields__)


class NoWorkers(RuntimeError):
    """No live worker can take the request."""


class WorkerState:
    __slots__ = ("card", "info", "requests", "stats")

    def __init__(self, info: InstanceInfo, card: ModelCard) -> None:
        self.info = info
        self.card = card
        self.stats: LoadStats | None = None
        self.requests = 0


class WorkerPool:
    """`start()`, then `wait_for_workers()`; `router` exists once the first card is seen."""

    def __init__(
        self,
        discovery: Discovery,
        events: EventPlane,
        client: RequestClient,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        policy: Policy = "round_robin",
        router_options: dict[str, Any] | None = None,
        roles: tuple[Role, ...] = ("aggregated", "decode"),
        accept: Callable[[ModelCard], str | None] | None = None,
    ) -> None:
        """`roles`: the worker roles this pool serves (others belong to another pool).
        `accept`: a further check of a joining worker's card; a reason refuses it."""
        self.roles = roles
        self._accept = accept
        self._discovery = discovery
        self._events = events
        self._client = client
        self.namespace = namespace
        self.policy = policy
        self._router_options = router_options or {}
        self.router: Router | None = None
        self.card: ModelCard | None = None
        self.workers: dict[str, WorkerState] = {}
        self._refused: set[str] = set()
        self._suspect: dict[str, float] = {}
        self._resyncing: dict[str, list[KvEventBatch]] = {}  # worker -> batches held back
        self.snapshots = 0
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        loads = await self._events.subscribe(load_subject(self.namespace), WorkerLoad)
        kv = await self._events.subscribe(kv_events_subject(self.namespace), KvEventBatch)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch(), name="pool-watch"),
            loop.create_task(self._follow(loads, self._on_load), name="pool-load"),
            loop.create_task(self._follow(kv, self._on_kv_events), name="pool-kv-events"),
        ]

    async def wait_for_workers(self, n: int = 1, timeout: float | None = None) -> None:
        """Return once `n` workers are live; TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while len(self.workers) < n:
                self._changed.clear()
                await self._changed.wait()

    async def admitted(self, instance_id: str, timeout: float | None = None) -> bool:
        """Wait until worker `instance_id` has joined (True) or been refused (False)."""
        async with asyncio.timeout(timeout):
            while instance_id not in self.workers:
                if instance_id in self._refused:
                    return False
                self._changed.clear()
                await self._changed.wait()
        return True

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- choosing ----------------------------------------------------------------------

    def select(
        self, request: GenerateRequest, tried: set[str], hashes: list[int] | None = None
    ) -> tuple[WorkerState, Decision]:
        """The worker for `request`, skipping `tried` and (while others exist) suspects.
        `hashes`: the prompt's sequence hashes, when the caller has them already."""
        now = time.monotonic()
        live = [w for w in self.workers if w not in tried]
        healthy = [w for w in live if self._suspect.get(w, 0.0) <= now]
        candidates = healthy or live
        if not candidates or self.router is None:
            raise NoWorkers(
                "no live worker can take this request" + (f" (tried {len(tried)})" if tried else "")
            )
        decision = self.router.select(
            request.prompt_token_ids,
            candidates,
            lora_name=request.lora_name,
            request_id=request.request_id,
            hashes=hashes,
        )
        return self.workers[decision.worker_id], decision

    def suspect(self, worker_id: str) -> None:
        """The worker refused a connection: avoid it for a while."""
        self._suspect[worker_id] = time.monotonic() + SUSPECT_SECONDS

    def first_token(self, request_id: str) -> None:
        if self.router is not None:
            self.router.first_token(request_id)

    def finish(self, request_id: str) -> None:
        if self.router is not None:
            self.router.finish(request_id)

    # -- introspection -----------------------------------------------------------------

    def stats(self) -> LoadStats:
        """The sum of the workers' published load."""
        totals = dict.fromkeys(_STAT_FIELDS, 0)
        for worker in self.workers.values():
            if worker.stats is not None:
                for name in _STAT_FIELDS:
                    totals[name] += getattr(worker.stats, name)
        return LoadStats(**totals)

    @property
    def error(self) -> str | None:
        """Why this pool cannot serve now (no live worker), else None."""
        return None if self.workers else "no live workers"

    def describe(self) -> list[dict[str, Any]]:
        index = self.router.index if self.router else None
        return [
            {
                "instance_id": w.info.instance_id,
                "address": w.info.address,
                "role": w.card.role,
                "requests": w.requests,
                "kv_usage": w.stats.kv_usage if w.stats else None,
                "indexed_blocks": index.num_blocks(w.info.instance_id) if index else 0,
            }
            for w in self.workers.values()
        ]

    # -- membership --------------------------------------------------------------------

    def _add(self, info: InstanceInfo) -> None:
        iid = info.instance_id
        try:
            card = ModelCard.from_metadata(info.metadata)
        except msgspec.ValidationError as exc:
            self._refuse(iid, f"refusing worker {iid} at {info.address}: no valid card ({exc})")
            return
        if card.role not in self.roles:
            return
        if self._accept is not None and (reason := self._accept(card)) is not None:
            self._refuse(iid, f"refusing {card.role} worker {iid} at {info.address}: {reason}")
            return
        if self.card is None:
            self.card = card
            self.router = Router(card.block_size, self.policy, **self._router_options)
            log.info(
                "serving model %r (block size %d) from its first worker %s; router policy %s",
                card.model,
                card.block_size,
                iid,
                self.policy,
            )
        reason = self.card.mismatch(card)
        if reason is not None:
            self._refuse(iid, f"refusing worker {iid} at {info.address}: card mismatch: {reason}")
            return
        state = self.workers.get(iid)
        if state is None:
            self.workers[iid] = WorkerState(info, card)
            assert self.router is not None
            self.router.add_worker(iid)
            log.info("worker %s at %s joined (%d live)", iid, info.address, len(self.workers))
        else:
            state.info, state.card = info, card
        self._suspect.pop(iid, None)
        self._changed.set()

    def _refuse(self, iid: str, message: str) -> None:
        if iid not in self._refused:
            self._refused.add(iid)
            log.error("%s", message)
            self._changed.set()

    def _remove(self, info: InstanceInfo) -> None:
        iid = info.instance_id
        self._refused.discard(iid)
        self._suspect.pop(iid, None)
        self._resyncing.pop(iid, None)
        if self.workers.pop(iid, None) is not None:
            if self.router is not None:
                self.router.remove_worker(iid)
            log.info("worker %s at %s left (%d live)", iid, info.address, len(self.workers))
            self._changed.set()

    async def _watch(self) -> None:
        prefix = f"{self.namespace}.{WORKER_COMPONENT}.{GENERATE_ENDPOINT}"
        while True:
            try:
                async with contextlib.aclosing(self._discovery.watch(prefix)) as events:
                    async for event in events:
                        if event.kind == "added":
                            self._add(event.instance)
                        else:
                            self._remove(event.instance)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("discovery watch failed; retrying in 1 s")
                await asyncio.sleep(1.0)

    # -- load and KV events ---------------------------------------------------------------

    async def _follow(self, sub: Any, handle: Any) -> None:
        try:
            async for msg in sub:
                handle(msg)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _on_load(self, msg: WorkerLoad) -> None:
        worker = self.workers.get(msg.worker_id)
        if worker is not None:
            worker.stats = msg.stats
            if self.router is not None:
                self.router.update_load(msg.worker_id, msg.stats)

    def _on_kv_events(self, batch: KvEventBatch) -> None:
        wid = batch.worker_id
        # Events of workers not (or no longer) live are ignored: a joining worker's first
        # batch then shows a gap and brings a snapshot, a leaving one's cannot resurrect it.
        if wid not in self.workers or self.router is None:
            return
        held = self._resyncing.get(wid)
        if held is not None:
            held.append(batch)
        elif not self.router.apply_events(wid, batch.events):
            self._resyncing[wid] = []
            task = asyncio.get_running_loop().create_task(
                self._resync(wid), name=f"kv-snapshot-{wid}"
            )
            self._tasks.append(task)  # a reference, so the loop does not drop it midway
            task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def _resync(self, worker_id: str) -> None:
        """Fetch the worker's snapshot, then replay the batches that came meanwhile."""
        while worker_id in self._resyncing:
            worker = self.workers.get(worker_id)
            if worker is None or self.router is None:
                return
            try:
                snap = await self._fetch_snapshot(worker.info.address)
            except Exception as exc:
                log.warning("KV snapshot of worker %s failed (%s); retrying in 1 s", worker_id, exc)
                await asyncio.sleep(1.0)
                continue
            held = self._resyncing.pop(worker_id, None)
            if held is None or worker_id not in self.workers:
                return
            self.snapshots += 1
            self.router.apply_snapshot(worker_id, snap.last_event_id, snap.blocks)
            log.info(
                "worker %s: KV index resynced from a snapshot (%d blocks, event %d)",
                worker_id,
                sum(len(b) for b in snap.blocks.values()),
                snap.last_event_id,
            )
            for batch in held:
                self._on_kv_events(batch)

    async def _fetch_snapshot(self, address: str) -> KvSnapshot:
        stream = self._client.call(
            address,
            KV_SNAPSHOT_ENDPOINT,
            KvSnapshotRequest(),
            response_type=KvSnapshot,
            timeout=SNAPSHOT_TIMEOUT,
        )
        async with stream:
            async for snap in stream:
                return snap
        raise RuntimeError("the worker sent no snapshot")
