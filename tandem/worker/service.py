"""The `tandem worker` process: one `Worker` on NATS discovery, the NATS event plane and a
TCP request server, until SIGTERM / SIGINT, which drains it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from tandem.protocol.worker import DEFAULT_NAMESPACE, ModelCard
from tandem.runtime import TcpRequestClient, TcpRequestServer
from tandem.runtime.heap import freeze_startup_heap
from tandem.runtime.tcp_plane import is_loopback
from tandem.worker.kv_transport import open_kv_transport
from tandem.worker.worker import Worker

log = logging.getLogger(__name__)


async def serve_worker(
    engine: Any,
    card: ModelCard,
    nats_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    advertise_host: str | None = None,
    insecure: bool = False,
    namespace: str = DEFAULT_NAMESPACE,
    lease_ttl: float | None = None,
    drain_timeout: float = 30.0,
    stop: asyncio.Event | None = None,
    instance_id: str | None = None,
    kv_transport: str = "auto",
) -> int:
    """Serve until `stop` is set or a SIGTERM / SIGINT arrives, then drain and return 0; or
    until the engine dies: the worker has left discovery by then, and this returns 1 (the
    process's exit status, so that a supervisor restarts it)."""
    from tandem.runtime.nats_discovery import NatsDiscovery
    from tandem.runtime.nats_event_plane import NatsEventPlane

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    discovery = await NatsDiscovery.connect(nats_url)
    events = await NatsEventPlane.connect(nats_url)
    client = TcpRequestClient()  # a decode worker pulls KV from prefill workers with it
    try:
        kv = open_kv_transport(engine, card.role, kv_transport, client, is_loopback(host))
        server = TcpRequestServer(host, port, advertise_host=advertise_host, insecure=insecure)
        worker = Worker(
            engine,
            card,
            discovery=discovery,
            events=events,
            server=server,
            namespace=namespace,
            lease_ttl=lease_ttl,
            kv=kv,
            instance_id=instance_id,
        )
        info = await worker.start()
        freeze_startup_heap()
        # One line on stdout that supervisors and tests can wait for.
        print(f"worker {info.instance_id} ready at {info.address}", flush=True)
        stopped = asyncio.ensure_future(stop.wait())
        died = asyncio.ensure_future(worker.dead.wait())
        try:
            await asyncio.wait([stopped, died], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            died.cancel()
        if worker.dead.is_set():
            log.error("worker %s: exiting, its engine died: %s", info.instance_id, worker.death)
            await worker.drain(1.0)  # its streams have failed already: let the errors out
            return 1
        log.info("worker %s: stopping", info.instance_id)
        await worker.drain(drain_timeout)
        return 0
    finally:
        with contextlib.suppress(Exception):
            await client.close()
        with contextlib.suppress(Exception):
            await discovery.close()
        with contextlib.suppress(Exception):
            await events.close()
