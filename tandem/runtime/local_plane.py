"""The request plane inside one process (embedded mode): same interface, no sockets.

Calls go straight to the handler without serialization (requests are converted to the
endpoint's `request_type` only if they are not already of it). The handler still runs as its own
task, as it would on a server, so the semantics match the TCP plane: leaving the stream early
cancels the handler (which sees `CancelledError`), deadlines cancel it and raise `TimeoutError`,
handler errors arrive as `RemoteError`, and a window of `window` items bounds how far a handler
runs ahead of a slow consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec

from tandem.runtime.addressing import new_instance_id
from tandem.runtime.errors import EndpointNotFound, PeerGone, RemoteError
from tandem.runtime.request_plane import (
    DEFAULT_WINDOW,
    END,
    DeadlineExceeded,
    ItemQueue,
    RequestClient,
    RequestServer,
    ResponseStream,
    describe,
    drive_handler,
    resolve_deadline,
)

log = logging.getLogger(__name__)

SCHEME = "inproc:"


class LocalRequestPlane:
    """The registry that in-process servers and clients meet in (one per embedded runtime)."""

    def __init__(self) -> None:
        self._servers: dict[str, LocalRequestServer] = {}

    def server(self) -> LocalRequestServer:
        return LocalRequestServer(self)

    def client(self, window: int = DEFAULT_WINDOW) -> LocalRequestClient:
        return LocalRequestClient(self, window)


class LocalRequestServer(RequestServer):
    def __init__(self, plane: LocalRequestPlane) -> None:
        super().__init__()
        self._plane = plane
        self._address = f"{SCHEME}{new_instance_id()}"
        self._calls: set[_LocalCall] = set()
        self._running = False

    @property
    def address(self) -> str:
        return self._address

    @property
    def inflight(self) -> int:
        return len(self._calls)

    async def start(self) -> None:
        self._running = True
        self._plane._servers[self._address] = self

    async def stop(self, grace: float = 0.0) -> None:
        self._running = False
        self._plane._servers.pop(self._address, None)
        tasks = [c.task for c in self._calls if c.task is not None]
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for call in list(self._calls):
            call.shutdown()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)


class _LocalCall:
    """A running handler and its output queue. The task references this, not the caller's
    `LocalResponseStream`, so dropping the stream is enough to cancel the handler."""

    __slots__ = ("endpoint", "queue", "server", "shutting_down", "space", "task", "window")

    def __init__(self, server: LocalRequestServer, endpoint: str, window: int) -> None:
        self.server = server
        self.endpoint = endpoint
        self.window = window
        self.queue = ItemQueue()
        self.space: asyncio.Future[None] | None = None
        self.shutting_down = False
        self.task: asyncio.Task[None] | None = None

    async def run(self, agen: Any, timeout: float | None) -> None:
        queue, window = self.queue, self.window

        async def emit(item: Any) -> None:
            while len(queue) >= window:
                self.space = asyncio.get_running_loop().create_future()
                await self.space
            queue.push(item)

        try:
            await drive_handler(agen, emit, timeout)
        except DeadlineExceeded as exc:
            queue.push(TimeoutError(f"remote deadline exceeded: {exc}"))
        except asyncio.CancelledError:
            if self.shutting_down:
                queue.push(RemoteError("server shut down", code="shutdown"))
        except Exception as exc:
            log.warning("handler %r failed: %s", self.endpoint, describe(exc), exc_info=True)
            queue.push(RemoteError(describe(exc)))
        else:
            queue.push(END)
        finally:
            self.server._calls.discard(self)

    def shutdown(self) -> None:
        self.shutting_down = True
        if self.task is not None:
            self.task.cancel()

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.queue.replace_all(END)


class LocalResponseStream(ResponseStream):
    def __init__(
        self,
        plane: LocalRequestPlane,
        address: str,
        endpoint: str,
        payload: Any,
        response_type: Any,
        deadline: float | None,
        window: int,
    ) -> None:
        self._plane = plane
        self._address = address
        self._endpoint = endpoint
        self._payload = payload
        self._response_type = response_type
        self._deadline = deadline
        self._window = window
        self._call: _LocalCall | None = None
        self._finished = False

    def _start(self) -> _LocalCall:
        server = self._plane._servers.get(self._address)
        if server is None or not server._running:
            raise PeerGone(f"no in-process server at {self._address}")
        endpoint = server.endpoints.get(self._endpoint)
        if endpoint is None:
            raise EndpointNotFound(f"no endpoint {self._endpoint!r} at {self._address}")
        request, self._payload = self._payload, None
        rtype = endpoint.request_type
        if rtype is not None and not (isinstance(rtype, type) and isinstance(request, rtype)):
            try:
                request = msgspec.convert(request, rtype)
            except msgspec.ValidationError as exc:
                raise RemoteError(str(exc), code="bad_request") from exc
        timeout = None
        if self._deadline is not None:
            timeout = self._deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError(f"deadline passed before {self._endpoint!r} was called")
        call = _LocalCall(server, self._endpoint, self._window)
        server._calls.add(call)
        call.task = asyncio.get_running_loop().create_task(
            call.run(endpoint.handler(request), timeout)
        )
        return call

    async def __anext__(self) -> Any:
        call = self._call
        if call is None:
            if self._finished:
                raise StopAsyncIteration
            try:
                call = self._call = self._start()
            except BaseException:
                self._finished = True
                raise
        if self._finished and not call.queue:
            raise StopAsyncIteration
        item = await call.queue.pop()
        space = call.space
        if space is not None and not space.done():
            space.set_result(None)
        if item is END:
            self._finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        rtype = self._response_type
        if rtype is not None and not (isinstance(rtype, type) and isinstance(item, rtype)):
            item = msgspec.convert(item, rtype)
        return item

    def buffered(self) -> int:
        return len(self._call.queue) if self._call is not None else 0

    def cancel(self) -> None:
        self._finished = True
        if self._call is not None:
            self._call.cancel()

    def __del__(self) -> None:
        call = self._call
        if call is not None and not self._finished:
            with contextlib.suppress(Exception):
                call.cancel()


class LocalRequestClient(RequestClient):
    def __init__(self, plane: LocalRequestPlane, window: int = DEFAULT_WINDOW) -> None:
        self._plane = plane
        self.window = max(1, window)

    def call(
        self,
        address: str,
        endpoint: str,
        payload: Any,
        *,
        response_type: Any = None,
        timeout: float | None = None,
        deadline: float | None = None,
        window: int | None = None,
    ) -> LocalResponseStream:
        return LocalResponseStream(
            self._plane,
            address,
            endpoint,
            payload,
            response_type,
            resolve_deadline(timeout, deadline),
            max(1, window or self.window),
        )

    async def close(self) -> None:
        pass
