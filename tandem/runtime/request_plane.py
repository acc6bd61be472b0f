"""The request plane's interface: endpoints are async generators, calls are response streams.

A server hosts named endpoints. An endpoint's handler takes the decoded request and is an async
generator of response items (one per token batch, say). A client's `call()` returns a
`ResponseStream`: iterate it to get the items; leaving it early (`break`, `aclose()`, `cancel()`,
garbage collection, the caller's task being cancelled) cancels the handler on the server, which
sees `asyncio.CancelledError` where it was suspended. The handler ending with an exception ends
the caller's iteration with `RemoteError` carrying its message; a deadline that passes cancels the
handler and raises `TimeoutError` to the caller; a peer that dies raises `PeerGone`.

Two implementations share this module's handler driver so they behave alike:
`tcp_plane` (between processes) and `local_plane` (embedded mode, no sockets, no serialization).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

Handler = Callable[[Any], AsyncIterator[Any]]
DEFAULT_WINDOW = 64


class Endpoint(NamedTuple):
    handler: Handler
    request_type: Any = None


class DeadlineExceeded(Exception):
    """Internal: the handler ran past the request's deadline and was cancelled."""


class _End:
    """Marks the normal end of a stream in an `ItemQueue`."""


END = _End()


class ItemQueue:
    """An unbounded FIFO with one consumer, cheaper than asyncio.Queue for one item per token.
    Bounds come from the flow control around it (credits or the local window)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def replace_all(self, item: Any) -> None:
        """Drop what is buffered and leave only `item` (a cancelled stream's END)."""
        self._items.clear()
        self.push(item)

    async def pop(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


def resolve_deadline(timeout: float | None, deadline: float | None) -> float | None:
    """The earlier of `time.monotonic() + timeout` and `deadline` (a `time.monotonic()` value)."""
    if timeout is not None:
        by_timeout = time.monotonic() + timeout
        deadline = by_timeout if deadline is None else min(deadline, by_timeout)
    return deadline


class ResponseStream(ABC):
    """The items of one call, as an async iterator that also cancels and closes.

    `async with client.call(...) as stream:` guarantees the cancel on exit; a plain `async for`
    that breaks early relies on the stream being garbage-collected (immediate in CPython)."""

    def __aiter__(self) -> ResponseStream:
        return self

    @abstractmethod
    async def __anext__(self) -> Any: ...

    @abstractmethod
    def cancel(self) -> None:
        """Stop the stream now; the remote handler is cancelled. Idempotent."""

    def buffered(self) -> int:
        """Items that arrived and that `__anext__` returns without waiting (the last may be
        the end of the stream or an error)."""
        return 0

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class RequestServer(ABC):
    """Hosts endpoints; `address` is what goes into `InstanceInfo.address`."""

    def __init__(self) -> None:
        self.endpoints: dict[str, Endpoint] = {}

    def add_endpoint(self, name: str, handler: Handler, request_type: Any = None) -> None:
        """Serve `handler` as `name`. With `request_type` (a msgspec type) the request is decoded
        and validated as that type; without it the caller gets plain msgpack data."""
        self.endpoints[name] = Endpoint(handler, request_type)

    @property
    @abstractmethod
    def address(self) -> str: ...

    @property
    @abstractmethod
    def inflight(self) -> int:
        """Streams whose handlers are still running."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting calls; let running handlers finish for up to `grace` seconds, then
        cancel them (callers get `RemoteError` with code `shutdown`)."""


class RequestClient(ABC):
    @abstractmethod
    def call(
        self,
        address: str,
        endpoint: str,
        payload: Any,
        *,
        response_type: Any = None,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> ResponseStream:
        """Call `endpoint` at `address` with `payload`; iterate the result for the responses.

        `timeout` is seconds from now, `deadline` a `time.monotonic()` value; the earlier wins.
        `response_type` decodes each item as that msgspec type."""

    @abstractmethod
    async def close(self) -> None: ...


async def drive_handler(
    agen: AsyncIterator[Any], emit: Callable[[Any], Awaitable[None]], timeout: float | None
) -> None:
    """Run a handler's generator to its end, passing each item to `emit` (which applies the
    backpressure). Raises `DeadlineExceeded` after `timeout` seconds, `CancelledError` when
    cancelled, and whatever the handler or `emit` raised.

    A cancellation that arrives while the generator is parked at a `yield` (because `emit` is
    waiting for credit or socket buffer space) is thrown into the generator, so the handler sees
    `CancelledError` in every case, as a plain coroutine would, and not a bare `GeneratorExit`.
    """
    expired = False
    try:
        async with asyncio.timeout(timeout) as scope:
            try:
                async for item in agen:
                    await emit(item)
            except asyncio.CancelledError:
                await _throw_cancel(agen)
                raise
    except TimeoutError:
        expired = scope.expired()
        if not expired:
            raise
    finally:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
    if expired:
        raise DeadlineExceeded(f"deadline of {timeout:.3f}s exceeded")


async def _throw_cancel(agen: Any) -> None:
    if getattr(agen, "ag_frame", None) is None or getattr(agen, "ag_running", True):
        return  # finished (the CancelledError came out of it) or not a suspended generator
    try:
        await agen.athrow(asyncio.CancelledError())
    except (asyncio.CancelledError, StopAsyncIteration):
        return
    except Exception:
        log.exception("handler raised while being cancelled")
        return
    # It swallowed the cancellation and yielded again: close it.
    with contextlib.suppress(Exception):
        await agen.aclose()


def describe(exc: BaseException) -> str:
    """How a handler's exception is reported to the caller."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
