"""`LocalCluster`: workers and the frontend's router in one process.

Embedded `tandem serve`, the tests and the benchmarks assemble the system here, with the
same `Worker`, `WorkerPool` router and KV-event code as distributed mode, over in-memory
discovery and events. The request plane is in-process (`transport="local"`: no sockets, no
serialization) or real TCP on loopback (`"tcp"`: what separate processes would use, KV
pulled over it by decode workers through `kv_transport`: tcp by default, or nixl, as
`tandem worker --kv-transport`). The engines belong to the caller, who shuts them down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Literal

from tandem.frontend.remote_engine import RemoteEngine
from tandem.protocol.worker import DEFAULT_NAMESPACE, Role
from tandem.runtime import (
    LocalRequestPlane,
    MemoryDiscovery,
    MemoryEventPlane,
    TcpRequestClient,
    TcpRequestServer,
    new_instance_id,
)
from tandem.transfer.local import LocalKvSource
from tandem.worker import Worker, model_card
from tandem.worker.kv_transport import KvTransport, open_kv_transport

Transport = Literal["local", "tcp"]
log = logging.getLogger(__name__)


class LocalCluster:
    """One worker per engine (`roles` gives each its role, default aggregated) and a
    `RemoteEngine` (`remote`: the frontend's engine client) routing over them. `frontend`
    options go to the RemoteEngine (policy, router_options, disagg, migration_limit, ...).
    Use as an async context manager, or `start()` and `stop()`."""

    def __init__(
        self,
        engines: Sequence[Any],
        roles: Sequence[Role] | None = None,
        *,
        served: str = "model",
        transport: Transport = "local",
        kv_transport: str = "tcp",
        namespace: str = DEFAULT_NAMESPACE,
        lease_ttl: float = 5.0,
        publish_interval: float = 0.05,
        **frontend: Any,
    ) -> None:
        roles = list(roles or ["aggregated"] * len(engines))
        if len(roles) != len(engines):
            raise ValueError(f"{len(engines)} engines but {len(roles)} roles")
        self.engines = list(engines)
        self.roles = roles
        self.discovery = MemoryDiscovery(default_ttl=lease_ttl)
        self.events = MemoryEventPlane()
        self.transport = transport
        self.kv_transport = kv_transport
        self._plane = LocalRequestPlane() if transport == "local" else None
        if self._plane is not None:
            self.client: Any = self._plane.client()
            self._kv_client: Any = None
        else:
            self.client = TcpRequestClient()
            self._kv_client = TcpRequestClient()  # decode workers pull KV with it
        self._served, self._namespace = served, namespace
        self._publish_interval = publish_interval
        self._local_sources: list[LocalKvSource] = []  # decode workers' (local transport)
        ids = [new_instance_id() for _ in engines]
        self.workers = [self._worker(engine, role, iid, ids)
                        for engine, role, iid in zip(engines, roles, ids, strict=True)]  # fmt: skip
        self.remote = RemoteEngine(self.discovery, self.events, self.client,
                                   namespace=namespace, **frontend)  # fmt: skip
        self._stopped = False

    def _worker(self, engine: Any, role: Role, iid: str, ids: list[str]) -> Worker:
        if self._plane is None:
            server: Any = TcpRequestServer()
            kv = open_kv_transport(engine, role, self.kv_transport, self._kv_client)
        else:
            server, kv = self._plane.server(), KvTransport(["tcp"])
            if role == "decode" and not getattr(engine, "kv_connector", ""):  # else its own
                kv.source = self._local_source(engine, ids)
        return Worker(
            engine,
            model_card(engine, self._served, role=role),
            discovery=self.discovery,
            events=self.events,
            server=server,
            namespace=self._namespace,
            instance_id=iid,
            publish_interval=self._publish_interval,
            kv=kv,
        )

    async def add_worker(self, engine: Any, role: Role = "aggregated") -> Worker:
        """One more worker on `engine` (the caller's, as at construction), started; returns
        once the frontend has admitted it."""
        iid = new_instance_id()
        if role == "prefill":  # the decode workers there are may pull from it
            for source in self._local_sources:
                source.register(iid, engine)
        ids = [w.instance_id for w in self.workers] + [iid]
        self.engines.append(engine)
        self.roles.append(role)
        worker = self._worker(engine, role, iid, ids)
        self.workers.append(worker)
        await worker.start()
        pool = self.remote.prefill if role == "prefill" else self.remote.pool
        await pool.admitted(iid)
        return worker

    async def remove_worker(self, worker: Worker, grace: float = 30.0) -> Any:
        """Drain `worker`: it leaves discovery at once, its in-flight requests finish within
        `grace` seconds, and the frontend moves the rest to the other workers. Returns its
        engine, for the caller to shut down or reuse."""
        await worker.drain(grace)
        i = self.workers.index(worker)  # after the drain: others may have left meanwhile
        del self.workers[i], self.roles[i]
        return self.engines.pop(i)

    def _local_source(self, engine: Any, ids: list[str]) -> LocalKvSource:
        exporters = {iid: e for iid, e, role in zip(ids, self.engines, self.roles, strict=True)
                     if role == "prefill"}  # fmt: skip
        source = LocalKvSource(engine.kv_layout)
        for iid, exporter in exporters.items():
            source.register(iid, exporter)
        self._local_sources.append(source)
        return source

    def worker(self, role: Role) -> Worker:
        """The first worker of `role`."""
        return next(w for w in self.workers if w.card.role == role)

    async def start(self, timeout: float = 30.0) -> LocalCluster:
        """Start every worker, then the frontend side; return once the frontend has taken
        in every worker or refused it (a card that does not match: the pool logs why, and
        requests go to the others, as in distributed mode)."""
        for worker in self.workers:
            await worker.start()
        await self.remote.start()
        async with asyncio.timeout(timeout):
            for worker in self.workers:
                pool = self.remote.prefill if worker.card.role == "prefill" else self.remote.pool
                await pool.admitted(worker.instance_id)
        return self

    async def stop(self, grace: float = 0.5) -> None:
        """Drain the workers (within `grace` seconds each), then close the frontend side.
        Only the first call does anything."""
        if self._stopped:
            return
        self._stopped = True
        for worker in self.workers:
            try:
                await worker.drain(grace)
            except Exception:  # one worker's fault must not keep the rest running
                log.exception("worker %s failed to drain", worker.instance_id)
        await self.remote.close()
        await self.client.close()
        if self._kv_client is not None:
            await self._kv_client.close()
        await self.discovery.close()

    async def __aenter__(self) -> LocalCluster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
