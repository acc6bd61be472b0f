"""The `tandem worker` process: one `Worker` on NATS discovery, the NATS event plane and a
TCP request server, until SIGTERM / SIGINT, which drains it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from tandem.protocol.worker import DEFAULT_NAMESPACE, ModelCard
from tandem.runtime import TcpRequestServer
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
    namespace: str = DEFAULT_NAMESPACE,
    lease_ttl: float | None = None,
    drain_timeout: float = 30.0,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until `stop` is set or a SIGTERM / SIGINT arrives; then drain and return."""
    from tandem.runtime.nats_discovery import NatsDiscovery
    from tandem.runtime.nats_event_plane import NatsEventPlane

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    discovery = await NatsDiscovery.connect(nats_url)
    events = await NatsEventPlane.connect(nats_url)
    try:
        server = TcpRequestServer(host, port, advertise_host=advertise_host)
        worker = Worker(
            engine,
            card,
            discovery=discovery,
            events=events,
            server=server,
            namespace=namespace,
            lease_ttl=lease_ttl,
        )
        info = await worker.start()
        # One line on stdout that supervisors and tests can wait for.
        print(f"worker {info.instance_id} ready at {info.address}", flush=True)
        await stop.wait()
        log.info("worker %s: stopping", info.instance_id)
        await worker.drain(drain_timeout)
    finally:
        with contextlib.suppress(Exception):
            await discovery.close()
        with contextlib.suppress(Exception):
            await events.close()
