"""The uvicorn server every Tandem HTTP process runs."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

log = logging.getLogger(__name__)


class ReadyServer(uvicorn.Server):
    """uvicorn's server, plus one log line once the port is open and a cleanup inside
    uvicorn's graceful exit (after SIGTERM uvicorn re-raises the signal, which ends the
    process before any `finally` of ours could run). `on_shutdown` may be async."""

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
            log.info("%s", self.ready_line)

    async def shutdown(self, sockets: Any = None) -> None:
        await super().shutdown(sockets)
        done = self.on_shutdown()
        if inspect.isawaitable(done):
            await done
