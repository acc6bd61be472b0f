"""`LocalCluster`: workers and the frontend's router in one process.

Embedded `tandem serve`, the tests and the benchmarks assemble the system here, with the
same `Worker`, `WorkerPool` router and KV-event code as distributed mode, over in-memory
discovery and events. The request plane is in-process (`transport="local"`: no sockets, no
serialization) or real TCP on loopback (`"tcp"`: what separate processes would use, KV
pulled over it by decode workers). The engines belong to the caller, who shuts them down.
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
from tandem.transfer.tcp import TcpKvSource
from tandem.worker import Worker, model_card

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
        if transport == "local":
            plane = LocalRequestPlane()
            self.client: Any = plane.client()
            self._kv_client: Any = None
            servers = [plane.server() for _ in engines]
        else:
            self.client = TcpRequestClient()
            self._kv_client = TcpRequestClient()  # decode workers pull KV with it
            servers = [TcpRequestServer() for _ in engines]
        ids = [new_instance_id() for _ in engines]
        self.workers = [
            Worker(
                engine,
                model_card(engine, served, role=role),
                discovery=self.discovery,
                events=self.events,
                server=server,
                namespace=namespace,
                instance_id=iid,
                publish_interval=publish_interval,
                kv_source=self._kv_source(engine, ids) if role == "decode" else None,
            )
            for engine, role, server, iid in zip(engines, roles, servers, ids, strict=True)
        ]
        self.remote = RemoteEngine(self.discovery, self.events, self.client,
                                   namespace=namespace, **frontend)  # fmt: skip
        self._stopped = False

    def _kv_source(self, engine: Any, ids: list[str]) -> Any:
        if self.transport == "tcp":
            return TcpKvSource(self._kv_client, engine.kv_layout)
        exporters = {iid: e for iid, e, role in zip(ids, self.engines, self.roles, strict=True)
                     if role == "prefill"}  # fmt: skip
        source = LocalKvSource(engine.kv_layout)
        for iid, exporter in exporters.items():
            source.register(iid, exporter)
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
