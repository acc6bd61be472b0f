"""One NATS connection per process, shared by discovery and the event plane.

It reconnects forever (a NATS restart is an outage of the control plane, not a reason for a
worker to exit) and tells listeners when it is back, so discovery can re-register and re-watch
at once instead of waiting for the next heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

log = logging.getLogger(__name__)

ReconnectListener = Callable[[], Awaitable[None]]


class NatsConnection:
    """A NATS client with JetStream and reconnect notifications. Build it with `connect()`."""

    def __init__(self, nc: Client, url: str) -> None:
        self.nc = nc
        self.url = url
        self.js: JetStreamContext = nc.jetstream()
        #: Incremented on every reconnect; watchers compare it to know they must resync.
        self.generation = 0
        self._listeners: list[ReconnectListener] = []
        self._closing = False

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str | None = None,
        reconnect_wait: float = 0.25,
        connect_timeout: float = 2.0,
    ) -> NatsConnection:
        """Connect to `url` (fails if unreachable now); afterwards reconnect without limit."""
        holder: list[NatsConnection] = []

        async def on_disconnect() -> None:
            if not (holder and holder[0]._closing):
                log.warning("NATS %s: disconnected; reconnecting", url)

        async def on_reconnect() -> None:
            if holder:
                await holder[0]._reconnected()

        async def on_error(exc: Exception) -> None:
            log.debug("NATS %s: %s", url, exc)

        nc = await nats.connect(
            url,
            name=name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=reconnect_wait,
            connect_timeout=connect_timeout,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            error_cb=on_error,
        )
        conn = cls(nc, url)
        holder.append(conn)
        return conn

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    def add_reconnect_listener(self, listener: ReconnectListener) -> None:
        self._listeners.append(listener)

    def remove_reconnect_listener(self, listener: ReconnectListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def _reconnected(self) -> None:
        self.generation += 1
        log.info("NATS %s: reconnected", self.url)
        for listener in list(self._listeners):
            # Run listeners as tasks: the reconnect callback must not block the client's loop.
            asyncio.get_running_loop().create_task(self._run_listener(listener))

    @staticmethod
    async def _run_listener(listener: ReconnectListener) -> None:
        try:
            await listener()
        except Exception:
            log.exception("NATS reconnect listener failed")

    async def close(self) -> None:
        self._closing = True
        if not self.nc.is_closed:
            await self.nc.close()
