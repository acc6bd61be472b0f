"""`Worker`: one engine served as the `generate` endpoint of a runtime component.

Lifecycle: `start()` serves the endpoint, starts load / KV event publishing, then registers
in discovery (last, so nobody is sent to a worker that cannot answer yet). `drain()` does the
reverse: revoke the lease first, so frontends stop routing here at once; let in-flight
requests finish within a grace period (new calls that still arrive are refused with
`shutdown`, which callers retry elsewhere since nothing was produced yet); then stop.
The caller owns the engine and shuts it down after `drain()`.

The lease is tied to the engine's health: when the engine's step loop dies, the worker
revokes its lease at once (routers stop sending work and forget its frozen load), stops
publishing, and sets `dead`, on which `tandem worker` exits non-zero so that its supervisor
restarts it. Its in-flight streams end with the engine's error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from tandem.protocol import GenerateOutput, GenerateRequest, KvSnapshot
from tandem.protocol.worker import (
    CANCEL_ENDPOINT,
    DEFAULT_NAMESPACE,
    GENERATE_ENDPOINT,
    KV_SNAPSHOT_ENDPOINT,
    WORKER_COMPONENT,
    Cancelled,
    CancelSequence,
    KvSnapshotRequest,
    ModelCard,
    Role,
)
from tandem.runtime import (
    Discovery,
    EventPlane,
    InstanceInfo,
    Lease,
    RequestServer,
    new_instance_id,
)
from tandem.transfer.tcp import KvExportServer
from tandem.worker.kv_peers import VerifiedKvSource
from tandem.worker.kv_transport import KvTransport
from tandem.worker.publisher import LoadPublisher

log = logging.getLogger(__name__)


def model_card(
    engine: Any, model: str, *, tokenizer: str | None = None, role: Role = "aggregated"
) -> ModelCard:
    """The card of `engine` (an AsyncEngine or anything with the same attributes)."""
    return ModelCard(
        model=model,
        model_path=str(engine.model_path),
        tokenizer=str(tokenizer or engine.model_path),
        block_size=engine.block_size,
        total_blocks=engine.stats().total_blocks,
        max_model_len=engine.max_model_len,
        max_logprobs=engine.max_logprobs,
        role=role,
        kv_layout=getattr(engine, "kv_layout", None),
        kv_connector=getattr(engine, "kv_connector", ""),
    )


class Worker:
    def __init__(
        self,
        engine: Any,
        card: ModelCard,
        *,
        discovery: Discovery,
        events: EventPlane,
        server: RequestServer,
        namespace: str = DEFAULT_NAMESPACE,
        instance_id: str | None = None,
        lease_ttl: float | None = None,
        publish_interval: float = 0.1,
        kv: KvTransport | None = None,
    ) -> None:
        """`kv`: how KV moves (`open_kv_transport`): the source a decode worker pulls with,
        what a prefill worker hands out with its exports; the worker keeps it alive."""
        self.engine = engine
        self.kv = kv if kv is not None else KvTransport(["tcp"])
        source = self.kv.source
        self.kv_source = (
            VerifiedKvSource(source, discovery, namespace) if source is not None else None
        )
        self.card = self.kv.card(card)
        self.namespace = namespace
        self.instance_id = instance_id or new_instance_id()
        self.lease_ttl = lease_ttl
        self._discovery = discovery
        self._server = server
        self._lease: Lease | None = None
        self._publisher = LoadPublisher(
            events,
            namespace,
            self.instance_id,
            engine.stats,
            engine.take_kv_events,
            take_steps=getattr(engine, "take_step_samples", None),
            role=card.role,
            interval=publish_interval,
        )
        self.info: InstanceInfo | None = None
        #: Set once the engine died and the worker left discovery; `death` says why.
        self.dead = asyncio.Event()
        self.death: BaseException | None = None
        self._leaving: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None

    @property
    def inflight(self) -> int:
        """Requests being served now."""
        return self._server.inflight

    async def start(self) -> InstanceInfo:
        if getattr(self.engine, "error", None) is not None:
            raise RuntimeError(f"the engine is dead: {self.engine.error}")
        self._server.add_endpoint(GENERATE_ENDPOINT, self._generate, GenerateRequest)
        self._server.add_endpoint(KV_SNAPSHOT_ENDPOINT, self._kv_snapshot, KvSnapshotRequest)
        self._server.add_endpoint(CANCEL_ENDPOINT, self._cancel, CancelSequence)
        if self.card.role == "prefill" and not self.card.kv_connector:
            KvExportServer(self.engine).add_endpoints(self._server)
        await self._server.start()
        self._publisher.start()
        self.info = InstanceInfo(
            namespace=self.namespace,
            component=WORKER_COMPONENT,
            endpoint=GENERATE_ENDPOINT,
            instance_id=self.instance_id,
            address=self._server.address,
            metadata=self.card.to_metadata(),
        )
        self._lease = await self._discovery.register(self.info, ttl=self.lease_ttl)
        self._watch_engine()
        log.info(
            "worker %s (%s, %s) registered as %s at %s",
            self.instance_id,
            self.card.model,
            self.card.role,
            self.info.key,
            self.info.address,
        )
        return self.info

    def _watch_engine(self) -> None:
        """Leave at once when the engine dies: by its death callback where it has one, else by
        polling its `error` (engines behind the same contract without the callback)."""
        loop = asyncio.get_running_loop()
        on_death = getattr(self.engine, "on_death", None)
        if on_death is not None:

            def died(exc: BaseException) -> None:  # in the engine's thread
                with contextlib.suppress(RuntimeError):  # our event loop is closed
                    loop.call_soon_threadsafe(self._engine_died, exc)

            on_death(died)
        else:
            self._monitor = loop.create_task(self._poll_engine(), name="engine-health")

    async def _poll_engine(self, interval: float = 0.5) -> None:
        while (error := getattr(self.engine, "error", None)) is None:
            await asyncio.sleep(interval)
        self._engine_died(error)

    def _engine_died(self, exc: BaseException) -> None:
        if self.death is not None:
            return
        self.death = exc
        log.error(
            "worker %s: the engine died (%s: %s); leaving discovery",
            self.instance_id,
            type(exc).__name__,
            exc,
        )
        self._leaving = asyncio.get_running_loop().create_task(self._leave(), name="leave")

    async def _leave(self) -> None:
        try:
            await self._deregister()
            with contextlib.suppress(Exception):
                await self._publisher.stop()
        finally:
            self.dead.set()

    async def _deregister(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                await lease.revoke()
            except Exception as exc:  # NATS down: the lease lapses by itself within its TTL
                log.warning("worker %s: deregistering failed (%s)", self.instance_id, exc)

    async def drain(self, grace: float = 30.0) -> None:
        """Deregister, finish in-flight requests for up to `grace` seconds, stop serving."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.cancel()
        await self._deregister()
        inflight = self._server.inflight
        if inflight:
            log.info(
                "worker %s: draining %d in-flight requests (grace %.0fs)",
                self.instance_id,
                inflight,
                grace,
            )
        await self._server.stop(grace)
        await self._publisher.stop()
        log.info("worker %s stopped", self.instance_id)

    async def _kv_snapshot(self, request: KvSnapshotRequest) -> AsyncIterator[KvSnapshot]:
        yield await self.engine.kv_snapshot()

    async def _cancel(self, request: CancelSequence) -> AsyncIterator[Cancelled]:
        if request.index < 0:
            raise ValueError(f"index must be >= 0, got {request.index}")
        self.engine.abort(request.request_id, request.index)
        yield Cancelled()

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        # Cancellation by the caller arrives here as CancelledError; leaving the engine's
        # generator then aborts the request and frees its blocks.
        if request.kv_export and self.card.role != "prefill":
            raise ValueError(f"this worker's role is {self.card.role}: it exports no KV")
        if request.kv_import is not None and self.card.kv_connector:
            if self.card.role != "decode":
                raise ValueError(f"this worker's role is {self.card.role}: it imports no KV")
            outputs = self.engine.generate(request)  # the engine's connector pulls
        elif request.kv_import is not None:
            if self.kv_source is None:
                raise ValueError(f"this worker's role is {self.card.role}: it imports no KV")
            outputs = self.engine.generate(request, self.kv_source)
        else:
            outputs = self.engine.generate(request)
        async for out in outputs:
            if out.kv_transfer is not None:  # where the decode worker pulls from
                out.kv_transfer.worker_id = self.instance_id
                out.kv_transfer.address = self._server.address
                out.kv_transfer.cuda_ipc = self.kv.cuda_ipc
                out.kv_transfer.nixl = self.card.kv_nixl
            yield out
