"""One NATS connection per process, shared by discovery and the event plane.

It reconnects forever (a NATS restart is an outage of the control plane, not a reason for a
worker to exit) and tells listeners when it is back, so discovery can re-register and re-watch
at once instead of waiting for the next heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext

log = logging.getLogger(__name__)

ReconnectListener = Callable[[], Awaitable[None]]

#: Where components read NATS credentials and TLS files: the environment, which children
#: inherit and other users cannot read from a command line. User, password and token may
#: also be in the URL (nats://user:password@host:4222).
NATS_ENV = {
    "creds": "TANDEM_NATS_CREDS",  # a .creds file: JWT and NKey seed (decentralised auth)
    "token": "TANDEM_NATS_TOKEN",
    "user": "TANDEM_NATS_USER",
    "password": "TANDEM_NATS_PASSWORD",
    "ca": "TANDEM_NATS_TLS_CA",
    "cert": "TANDEM_NATS_TLS_CERT",
    "key": "TANDEM_NATS_TLS_KEY",
}


def nats_options() -> dict[str, Any]:
    """`nats.connect` keywords for this process's NATS credentials and TLS. A CA alone checks
    the server's certificate; a certificate and key show ours too (mutual TLS)."""
    env = {name: os.environ.get(var) or None for name, var in NATS_ENV.items()}
    options: dict[str, Any] = {}
    if env["creds"]:
        options["user_credentials"] = env["creds"]
    for name in ("token", "user", "password"):
        if env[name]:
            options[name] = env[name]
    if bool(env["cert"]) != bool(env["key"]):
        raise ValueError("NATS TLS needs TANDEM_NATS_TLS_CERT and TANDEM_NATS_TLS_KEY together")
    if env["ca"] or env["cert"]:
        context = ssl.create_default_context(cafile=env["ca"])
        if env["cert"]:
            context.load_cert_chain(env["cert"], env["key"])
        options["tls"] = context
    return options


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
        first_connect_timeout: float = 30.0,
    ) -> NatsConnection:
        """Connect to `url`, retrying for up to `first_connect_timeout` seconds (NATS may
        start after us), then reconnect without limit. Refused credentials or TLS fail at
        once; both raise ConnectionError naming the cause."""
        holder: list[NatsConnection] = []
        refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
        errors: list[Exception] = []

        async def on_disconnect() -> None:
            if holder and not holder[0]._closing:
                log.warning("NATS %s: disconnected; reconnecting", url)

        async def on_reconnect() -> None:
            if holder:
                await holder[0]._reconnected()

        async def on_error(exc: Exception) -> None:
            if _is_refusal(exc):
                log.error("NATS %s refused us: %s", url, exc)
                if not refused.done():
                    refused.set_result(exc)
            elif not holder:
                if not errors:
                    log.warning("NATS %s not reachable yet (%s); retrying for up to %.0f s",
                                url, exc, first_connect_timeout)  # fmt: skip
                errors.append(exc)
            else:
                log.debug("NATS %s: %s", url, exc)

        nc = Client()
        connecting = asyncio.ensure_future(nc.connect(
            url, **nats_options(), name=name, allow_reconnect=True, max_reconnect_attempts=-1,
            reconnect_time_wait=reconnect_wait, connect_timeout=connect_timeout,
            disconnected_cb=on_disconnect, reconnected_cb=on_reconnect, error_cb=on_error,
        ))  # fmt: skip
        try:
            done, _ = await asyncio.wait({connecting, refused}, timeout=first_connect_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        except BaseException:
            connecting.cancel()
            await _close_quietly(nc)
            raise
        if connecting not in done:
            connecting.cancel()
            await _close_quietly(nc)
            if refused.done():
                cause = refused.result()
                raise ConnectionError(
                    f"NATS at {url} refused this component: {cause} (see TANDEM_NATS_* for"
                    " credentials and TLS)"
                ) from cause
            last = f": {errors[-1]}" if errors else ""
            raise ConnectionError(
                f"cannot connect to NATS at {url} within {first_connect_timeout:.0f} s{last}"
            )
        connecting.result()
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


def _is_refusal(exc: Exception) -> bool:
    """Errors that retrying cannot fix: credentials or TLS the server will not take."""
    text = str(exc).lower()
    return isinstance(exc, ssl.SSLError) or any(
        word in text for word in ("authorization", "authentication", "tls", "ssl")
    )


async def _close_quietly(nc: Client) -> None:
    with contextlib.suppress(Exception):
        await nc.close()
