"""`RemoteEngine`: the frontend's `EngineClient` for workers in other processes.

A `WorkerPool` (tandem.router) knows the live workers, their load and KV blocks, and picks
one per request with its router policy; this class proxies the token stream over the request
plane and tells the pool how the request goes (first token, end), which books its load.

Failure handling, and why:
* A worker that leaves discovery (drain or lease expiry) gets no new request from that moment;
  its in-flight streams continue (a draining worker finishes them).
* A call that fails before the worker produced anything (connection refused, worker shutting
  down) is retried on another worker: nothing was generated, so nothing can be duplicated.
* A worker that dies or fails mid-stream (or sends nothing for too long) loses no stream:
  the request migrates, up to `migration_limit` times, to another worker with the tokens
  streamed so far (`output_token_ids`); that worker recomputes their KV and goes on, so the
  client sees every token once (see `migration`). Past the limit (0: never) the stream
  ends with `WorkerLost`, which the HTTP layer turns into an error response or SSE event.
* A worker whose engine died refuses new work with `EngineDeadError` until it has left
  discovery (at once): that refusal is retried elsewhere too, as nothing was generated.
* Every call has a deadline: a stream's first output must come within `first_output_timeout`
  seconds (the worker is wedged otherwise: the call is cancelled, the worker avoided for a
  while, and the request fails with `WorkerLost`), and, with `output_timeout`, each later one.

Disaggregated serving: when prefill workers are live, a request whose uncached prompt is long
goes first to a prefill worker (chosen by its own KV-aware router) with `kv_export`; its first
token streams to the client at once, and the returned `KvTransferParams` go with the request
to a decode worker (`kv_import`), which pulls the blocks and generates the rest. Either way:
* No prefill worker can take it (none live, all refused): prefill on the decode worker
  (counted in `tandem_disagg_fallbacks`).
* The decode side never gets the blocks (no decode worker, the client left): the frontend
  releases them on the prefill worker; a transfer that fails is the decode worker's to
  handle (it computes the prompt itself), and the prefill worker's deadline frees what
  nobody released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from tandem.frontend.disagg import (
    DisaggCollector,
    DisaggConfig,
    DisaggPlanner,
    prefill_then_decode,
)
from tandem.frontend.migration import MIGRATION_LIMIT, Migration, WorkerLost
from tandem.frontend.request_reports import PlanFollower, RequestReporter
from tandem.frontend.streams import OutputTimeout, coalesced, next_output
from tandem.protocol import GenerateOutput, GenerateRequest, KvTransferParams, LoadStats
from tandem.protocol.worker import (
    CANCEL_ENDPOINT,
    DEFAULT_NAMESPACE,
    GENERATE_ENDPOINT,
    Cancelled,
    CancelSequence,
    ModelCard,
)
from tandem.router.pool import NoWorkers, WorkerPool
from tandem.router.router import Policy
from tandem.runtime import (
    Discovery,
    EventPlane,
    PeerGone,
    RemoteError,
    RequestClient,
    ResponseStream,
    new_instance_id,
)
from tandem.transfer.release import release_kv

log = logging.getLogger(__name__)

#: Seconds a worker may take to produce a stream's first output (queueing, prefill, a KV
#: import) before the frontend gives up on it.
FIRST_OUTPUT_TIMEOUT = 60.0
#: Seconds a per-sequence cancel may take.
CANCEL_TIMEOUT = 10.0
#: How a worker's engine that died refuses new requests (see `AsyncEngine.generate`).
_ENGINE_DEAD = "EngineDeadError"

__all__ = ["MIGRATION_LIMIT", "NoWorkers", "RemoteEngine", "WorkerLost"]


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
        policy: Policy = "round_robin",
        router_options: dict[str, Any] | None = None,
        disagg: DisaggConfig | None = None,
        first_output_timeout: float | None = FIRST_OUTPUT_TIMEOUT,
        output_timeout: float | None = None,
        migration_limit: int = MIGRATION_LIMIT,
        report_interval: float = 1.0,
    ) -> None:
        """`first_output_timeout`: seconds a worker may take to start a stream (None: no
        limit); `output_timeout`: seconds between two outputs of a stream (None: no limit);
        `migration_limit`: times a request may move to another worker after its worker was
        lost (0: never); `report_interval`: seconds between two request reports to the
        planner."""
        self.migration = Migration(self._generate, migration_limit)
        self.first_output_timeout = first_output_timeout
        self.output_timeout = output_timeout
        common = dict(namespace=namespace, policy=policy, router_options=router_options)
        # Decode (and aggregated) workers; prefill workers, always KV-aware: their prefix
        # caches are what saves prefill work.
        self.pool = WorkerPool(
            discovery, events, client, **common, accept=lambda c: self._pairs(c, self.prefill)
        )
        common["policy"] = "kv"
        self.prefill = WorkerPool(
            discovery,
            events,
            client,
            **common,
            roles=("prefill",),
            accept=lambda c: self._pairs(c, self.pool),
        )
        self.planner = DisaggPlanner(self.prefill, self.pool, disagg or DisaggConfig())
        self.fallbacks: Counter[str] = Counter()
        self._client = client
        self.namespace = namespace
        self.reports = RequestReporter(events, namespace, new_instance_id(), report_interval)
        self.plan = PlanFollower(events, namespace)
        self._streams: dict[str, ResponseStream] = {}
        self._addresses: dict[str, str] = {}  # where each stream runs (per-sequence cancel)
        self._tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def _pairs(card: ModelCard, other: WorkerPool) -> str | None:
        """Why a joining worker cannot exchange KV with the other pool's workers (checked
        when it registers, so that no request discovers it mid-transfer)."""
        if other.card is None or card.role == "aggregated" or other.card.role == "aggregated":
            return None
        reason = other.card.mismatch(card) or other.card.kv_mismatch(card)
        return (
            None if reason is None else f"cannot pair with the {other.card.role} workers: {reason}"
        )

    @property
    def card(self) -> ModelCard | None:
        return self.pool.card

    @property
    def max_model_len(self) -> int:
        return self.pool.card.max_model_len if self.pool.card else 0

    @property
    def max_logprobs(self) -> int:
        return self.pool.card.max_logprobs if self.pool.card else 0

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.pool.start()
        await self.prefill.start()
        self.reports.start()
        await self.plan.start()

    async def wait_for_workers(
        self, n: int = 1, timeout: float | None = None, prefill: int = 0
    ) -> None:
        """`n` decode (or aggregated) workers and `prefill` prefill workers."""
        async with asyncio.timeout(timeout):
            await self.pool.wait_for_workers(n)
            await self.prefill.wait_for_workers(prefill)

    async def close(self) -> None:
        await self.reports.stop()
        await self.plan.stop()
        await self.pool.close()
        await self.prefill.close()
        for stream in list(self._streams.values()):
            stream.cancel()

    # -- EngineClient --------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        return self.reports.observe(request, self.migration.generate(request))

    @property
    def migrations(self) -> int:
        return self.migration.count

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        if request.output_token_ids:  # migrated: recomputed where it goes on
            outputs = self.stream_from(self.pool, request)
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    yield out
            return
        plan = self.planner.plan(request)
        if plan.path == "remote":
            outputs = prefill_then_decode(self, request, plan.hashes)
        else:
            outputs = self.stream_from(self.pool, request, plan.hashes)
        async with contextlib.aclosing(outputs):
            async for out in outputs:
                yield out

    def release_export(self, params: KvTransferParams) -> None:
        """Free exported blocks that no decode worker will take (in the background)."""

        task = asyncio.get_running_loop().create_task(release_kv(self._client, params))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stream_from(
        self, pool: WorkerPool, request: GenerateRequest, hashes: list[int] | None = None
    ) -> AsyncIterator[GenerateOutput]:
        """Run `request` on a worker of `pool`, retrying others while none has produced
        anything. `hashes`: the prompt's block hashes, if already computed."""
        rid = request.request_id
        tried: set[str] = set()
        try:
            while True:
                worker, _ = pool.select(request, tried, hashes)
                tried.add(worker.info.instance_id)
                stream = self._client.call(
                    worker.info.address, GENERATE_ENDPOINT, request, response_type=GenerateOutput
                )
                self._streams[rid] = stream
                self._addresses[rid] = worker.info.address
                try:
                    first = await next_output(stream, self.first_output_timeout)
                except StopAsyncIteration:  # aborted before the first output
                    self._forget(rid, stream)
                    return
                except OutputTimeout as exc:
                    self._forget(rid, stream)  # cancels the call: the worker aborts it
                    pool.suspect(worker.info.instance_id)
                    log.error(
                        "worker %s at %s sent no output for request %s in %.0f s",
                        worker.info.instance_id,
                        worker.info.address,
                        rid,
                        exc.seconds,
                    )
                    raise WorkerLost(
                        f"the worker chosen for this request ({worker.info.instance_id}) did"
                        f" not start it within {exc.seconds:.0f} s"
                    ) from None
                except (PeerGone, RemoteError) as exc:
                    self._forget(rid, stream)
                    if isinstance(exc, PeerGone) or _unavailable(exc):
                        # Nothing was generated: safe to try another worker.
                        log.warning(
                            "worker %s at %s unavailable (%s); trying another",
                            worker.info.instance_id,
                            worker.info.address,
                            exc,
                        )
                        if isinstance(exc, PeerGone) or exc.code == "handler_error":
                            pool.suspect(worker.info.instance_id)
                        continue
                    raise _translate(exc) from exc
                except BaseException:
                    self._forget(rid, stream)
                    raise
                break
            worker.requests += 1
            pool.first_token(rid)
            try:
                async for out in coalesced(stream, first, self.output_timeout):
                    yield out
            except OutputTimeout as exc:
                pool.suspect(worker.info.instance_id)
                raise WorkerLost(
                    f"the worker serving this request ({worker.info.instance_id}) sent nothing"
                    f" for {exc.seconds:.0f} s"
                ) from None
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
        finally:
            pool.finish(rid)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Cancel the request's stream: the worker's handler is cancelled and aborts it. One
        sequence of `n` (`index`: a stop string ended its choice) is stopped by a cancel
        message to the worker serving it, sent in the background."""
        parts = self.migration.parts(request_id, index)
        if parts:  # a request of n split by a migration: one part per sequence
            for part in parts:
                self.abort(part)
            return
        if index is None:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.cancel()
            return
        address = self._addresses.get(request_id)
        if address is not None:
            task = asyncio.get_running_loop().create_task(
                self._cancel(address, CancelSequence(request_id=request_id, index=index))
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _cancel(self, address: str, message: CancelSequence) -> None:
        """A failure is only logged: the sequence then runs to its own end and the frontend,
        which already ended that choice, drops its outputs."""
        try:
            async with self._client.call(
                address, CANCEL_ENDPOINT, message, response_type=Cancelled, timeout=CANCEL_TIMEOUT
            ) as stream:
                async for _ in stream:
                    pass
        except Exception as exc:
            log.warning(
                "request %s: cancelling sequence %d on %s failed (%s)",
                message.request_id, message.index, address, exc,
            )  # fmt: skip

    def stats(self) -> LoadStats:
        totals = [self.pool.stats(), self.prefill.stats()]
        return LoadStats(
            **{f: sum(getattr(t, f) for t in totals) for f in LoadStats.__struct_fields__}
        )

    # -- introspection (/health) -----------------------------------------------------------

    @property
    def error(self) -> str | None:
        return self.pool.error

    def describe(self) -> list[dict[str, Any]]:
        return self.pool.describe() + self.prefill.describe()

    def metrics_collectors(self) -> list[Any]:
        from tandem.frontend.metrics import MigrationCollector, PlannerCollector
        from tandem.router.metrics import RouterCollector

        return [
            RouterCollector(self.pool),
            RouterCollector(self.prefill, prefix="tandem_prefill_router"),
            DisaggCollector(self.planner, self.fallbacks),
            MigrationCollector(self),
            PlannerCollector(self.plan),
        ]

    def _forget(self, rid: str, stream: ResponseStream) -> None:
        if self._streams.get(rid) is stream:
            del self._streams[rid]
            self._addresses.pop(rid, None)
        stream.cancel()


def _unavailable(exc: RemoteError) -> bool:
    """The worker refused before doing anything (draining, full, its engine dead)."""
    return exc.code in ("shutdown", "overloaded") or (
        exc.code == "handler_error" and str(exc).startswith(_ENGINE_DEAD)
    )


def _translate(exc: RemoteError) -> Exception:
    """A worker's refusal of an invalid request becomes ValueError, as from a local engine."""
    message = str(exc)
    prefix = "ValueError: "
    if message.startswith(prefix):
        return ValueError(message[len(prefix) :])
    return WorkerLost(f"the worker failed this request: {message}")
