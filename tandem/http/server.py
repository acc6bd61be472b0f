"""The uvicorn server every Tandem HTTP process runs."""

from __future__ import annotations

import inspect
import logging
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

from tandem.runtime.heap import freeze_startup_heap

log = logging.getLogger(__name__)


class ReadyServer(uvicorn.Server):
    """uvicorn's server, plus one log line once the port is open (the start-up heap frozen
    then: `tandem.runtime.heap`) and a cleanup inside uvicorn's graceful exit (after SIGTERM
    uvicorn re-raises the signal, which ends the process before any `finally` of ours could
    run). `on_shutdown` may be async."""

    def __init__(
        self,
        config: uvicorn.Config,
        ready_line: str,
        on_shutdown: Callable[[], Awaitable[None] | None],
    ) -> None:
        super().__init__(config)
        self.ready_line = ready_line
        self.on_shutdown = on_shutdown

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            freeze_startup_heap()
            log.info("%s", self.ready_line)

    async def shutdown(self, sockets: Any = None) -> None:
        await super().shutdown(sockets)
        done = self.on_shutdown()
        if inspect.isawaitable(done):
            await done


def bind_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A socket bound (not yet listening) to host:port; uvicorn listens on it later. With
    `reuse_port`, other processes may bind the same port too and the kernel spreads new
    connections over them (SO_REUSEPORT: several frontends behind one port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says it is TCP; without it the first SSE chunk on a reused connection
    # can wait ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def bind_or_report(
    host: str, port: int, command: str, reuse_port: bool = False
) -> socket.socket | None:
    """`bind_socket`, or None after telling stderr why `tandem COMMAND` cannot listen."""
    try:
        return bind_socket(host, port, reuse_port)
    except OSError as exc:
        print(f"tandem {command}: error: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return None


def url_host(host: str) -> str:
    """`host` as it goes in a URL (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host else host
