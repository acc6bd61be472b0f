"""`RemoteEngine`: the frontend's `EngineClient` for workers in other processes.

It watches discovery for `<namespace>.backend.generate` instances, keeps the ones whose model
card agrees with the first one seen (model name, block size; others are refused with an
error log line), sends each request to the next live worker in turn (round robin; the KV-aware
router comes later), and proxies the token stream over the request plane. `stats()` sums the
`WorkerLoad` figures the workers publish on the event plane, so admission control and
metrics see the whole pool.

Failure handling, and why:
* A worker that leaves discovery (drain or lease expiry) gets no new request from that moment;
  its in-flight streams continue (a draining worker finishes them).
* A call that fails before the worker produced anything (connection refused, worker shutting
  down) is retried on another worker: nothing was generated, so nothing can be duplicated.
* A worker that dies mid-stream ends the stream with `WorkerLost`, which the HTTP layer turns
  into an error response or SSE error event; no retry yet (request migration is a later issue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from tandem.protocol import GenerateOutput, GenerateRequest, LoadStats
from tandem.protocol.worker import (
    DEFAULT_NAMESPACE,
    GENERATE_ENDPOINT,
    WORKER_COMPONENT,
    ModelCard,
    WorkerLoad,
    load_subject,
)
from tandem.runtime import (
    Discovery,
    EventPlane,
    InstanceInfo,
    PeerGone,
    RemoteError,
    RequestClient,
    ResponseStream,
)

log = logging.getLogger(__name__)

#: How long a worker that refused a connection is skipped (unless nothing else is left).
SUSPECT_SECONDS = 5.0
_STAT_FIELDS = tuple(LoadStats.__struct_fields__)


class NoWorkers(RuntimeError):
    """No live worker can take the request."""


class WorkerLost(RuntimeError):
    """The worker serving a stream died or failed mid-stream."""


class _WorkerState:
    __slots__ = ("card", "info", "requests", "stats")

    def __init__(self, info: InstanceInfo, card: ModelCard) -> None:
        self.info = info
        self.card = card
        self.stats: LoadStats | None = None
        self.requests = 0


class RemoteEngine:
    """An `EngineClient` over the workers found in discovery. `start()`, then
    `wait_for_workers()` before building the app (the card gives max_model_len)."""

    def __init__(
        self,
        discovery: Discovery,
        events: EventPlane,
        client: RequestClient,
        *,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> None:
        self._discovery = discovery
        self._events = events
        self._client = client
        self.namespace = namespace
        self.card: ModelCard | None = None
        self.max_model_len = 0
        self.max_logprobs = 0
        self._workers: dict[str, _WorkerState] = {}
        self._refused: set[str] = set()
        self._suspect: dict[str, float] = {}
        self._next = 0
        self._streams: dict[str, ResponseStream] = {}
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        sub = await self._events.subscribe(load_subject(self.namespace), WorkerLoad)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch(), name="remote-engine-watch"),
            loop.create_task(self._follow_load(sub), name="remote-engine-load"),
        ]

    async def wait_for_workers(self, n: int = 1, timeout: float | None = None) -> None:
        """Return once `n` workers are live; TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while len(self._workers) < n:
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        for stream in list(self._streams.values()):
            stream.cancel()

    # -- EngineClient --------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        rid = request.request_id
        tried: set[str] = set()
        while True:
            worker = self._pick(tried)
            tried.add(worker.info.instance_id)
            stream = self._client.call(
                worker.info.address, GENERATE_ENDPOINT, request, response_type=GenerateOutput
            )
            self._streams[rid] = stream
            try:
                first = await anext(stream)
            except StopAsyncIteration:  # aborted before the first output
                self._forget(rid, stream)
                return
            except (PeerGone, RemoteError) as exc:
                self._forget(rid, stream)
                if isinstance(exc, PeerGone) or exc.code in ("shutdown", "overloaded"):
                    # Nothing was generated: safe to try another worker.
                    log.warning(
                        "worker %s at %s unavailable (%s); trying another",
                        worker.info.instance_id,
                        worker.info.address,
                        exc,
                    )
                    if isinstance(exc, PeerGone):
                        self._suspect[worker.info.instance_id] = time.monotonic() + SUSPECT_SECONDS
                    continue
                raise _translate(exc) from exc
            except BaseException:
                self._forget(rid, stream)
                raise
            break
        worker.requests += 1
        try:
            yield first
            async for out in stream:
                yield out
        except PeerGone as exc:
            log.error(
                "worker %s at %s died while streaming request %s: %s",
                worker.info.instance_id,
                worker.info.address,
                rid,
                exc,
            )
            raise WorkerLost(
                f"the worker serving this request ({worker.info.instance_id}) died mid-stream"
            ) from exc
        except RemoteError as exc:
            raise WorkerLost(
                f"the worker serving this request ({worker.info.instance_id}) failed: {exc}"
            ) from exc
        finally:
            self._forget(rid, stream)

    def abort(self, request_id: str) -> None:
        """Cancel the request's stream: the worker's handler is cancelled and aborts it."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.cancel()

    def stats(self) -> LoadStats:
        totals = dict.fromkeys(_STAT_FIELDS, 0)
        for worker in self._workers.values():
            if worker.stats is not None:
                for name in _STAT_FIELDS:
                    totals[name] += getattr(worker.stats, name)
        return LoadStats(**totals)

    # -- introspection (/health) -----------------------------------------------------------

    @property
    def error(self) -> str | None:
        """Why this engine cannot serve now (no live worker), else None."""
        return None if self._workers else "no live workers"

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "instance_id": w.info.instance_id,
                "address": w.info.address,
                "role": w.card.role,
                "requests": w.requests,
                "kv_usage": w.stats.kv_usage if w.stats else None,
            }
            for w in self._workers.values()
        ]

    # -- internals -----------------------------------------------------------------------

    def _pick(self, tried: set[str]) -> _WorkerState:
        now = time.monotonic()
        live = [w for w in self._workers.values() if w.info.instance_id not in tried]
        healthy = [w for w in live if self._suspect.get(w.info.instance_id, 0.0) <= now]
        candidates = healthy or live
        if not candidates:
            raise NoWorkers(
                "no live worker can take this request" + (f" (tried {len(tried)})" if tried else "")
            )
        self._next = (self._next + 1) % (1 << 62)
        return candidates[self._next % len(candidates)]

    def _forget(self, rid: str, stream: ResponseStream) -> None:
        if self._streams.get(rid) is stream:
            del self._streams[rid]
        stream.cancel()

    def _add(self, info: InstanceInfo) -> None:
        iid = info.instance_id
        try:
            card = ModelCard.from_metadata(info.metadata)
        except msgspec.ValidationError as exc:
            if iid not in self._refused:
                self._refused.add(iid)
                log.error(
                    "refusing worker %s at %s: no valid model card (%s)", iid, info.address, exc
                )
            return
        if self.card is None:
            self.card = card
            self.max_model_len = card.max_model_len
            self.max_logprobs = card.max_logprobs
            log.info(
                "serving model %r (block size %d) from its first worker %s",
                card.model,
                card.block_size,
                iid,
            )
        reason = self.card.mismatch(card)
        if reason is not None:
            if iid not in self._refused:
                self._refused.add(iid)
                log.error(
                    "refusing worker %s at %s: its model card does not match: %s",
                    iid,
                    info.address,
                    reason,
                )
            return
        state = self._workers.get(iid)
        if state is None:
            self._workers[iid] = _WorkerState(info, card)
            log.info("worker %s at %s joined (%d live)", iid, info.address, len(self._workers))
        else:
            state.info, state.card = info, card
        self._suspect.pop(iid, None)
        self._changed.set()

    def _remove(self, info: InstanceInfo) -> None:
        iid = info.instance_id
        self._refused.discard(iid)
        self._suspect.pop(iid, None)
        if self._workers.pop(iid, None) is not None:
            log.info("worker %s at %s left (%d live)", iid, info.address, len(self._workers))
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

    async def _follow_load(self, sub: Any) -> None:
        try:
            async for msg in sub:
                worker = self._workers.get(msg.worker_id)
                if worker is not None:
                    worker.stats = msg.stats
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def _translate(exc: RemoteError) -> Exception:
    """A worker's refusal of an invalid request becomes ValueError, as from a local engine."""
    message = str(exc)
    prefix = "ValueError: "
    if message.startswith(prefix):
        return ValueError(message[len(prefix) :])
    return WorkerLost(f"the worker failed this request: {message}")
