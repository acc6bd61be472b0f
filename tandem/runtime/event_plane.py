"""The event plane: publish / subscribe by subject, for KV events and load figures.

Delivery is at most once, like NATS core: a publisher does not wait for subscribers, and a
subscriber that falls too far behind loses events rather than making the publisher (an engine's
step loop) wait. Consumers that need completeness check sequence numbers (`KvEvent.event_id`)
and resynchronise, as the router does.

Subjects are dot-separated tokens; subscriptions may use NATS wildcards: `*` matches one token,
`>` (last) matches one or more. Payloads are msgspec Structs encoded as msgpack; a subscription
decodes them into its type, and logs and skips what does not decode.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Generic, TypeVar

import msgspec

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_MAX_PENDING = 65536

_encoder = msgspec.msgpack.Encoder()


def encode_event(event: Any) -> bytes:
    return _encoder.encode(event)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a trailing `>` is one or more tokens."""
    ptoks = pattern.split(".")
    stoks = subject.split(".")
    for i, ptok in enumerate(ptoks):
        if ptok == ">" and i == len(ptoks) - 1:
            return len(stoks) > i
        if i >= len(stoks) or (ptok != "*" and ptok != stoks[i]):
            return False
    return len(ptoks) == len(stoks)


class Subscription(ABC, Generic[T]):
    """Decoded events of one subscription, as an async iterator. `unsubscribe()` ends it."""

    def __init__(self, subject: str, type_: type[T]) -> None:
        self.subject = subject
        self._decoder = msgspec.msgpack.Decoder(type_)
        #: Events lost because this subscriber fell behind (memory implementation).
        self.dropped = 0

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            data = await self._next_raw()
            if data is None:
                raise StopAsyncIteration
            try:
                return self._decoder.decode(data)
            except msgspec.DecodeError as exc:
                log.error("event plane: undecodable event on %r skipped: %s", self.subject, exc)

    @abstractmethod
    async def _next_raw(self) -> bytes | None:
        """The next payload, or None once unsubscribed."""

    @abstractmethod
    async def unsubscribe(self) -> None: ...


class EventPlane(ABC):
    @abstractmethod
    async def publish(self, subject: str, event: Any) -> None:
        """Send `event` (a msgspec Struct, or anything msgpack-encodable) to `subject`.
        Best effort: it does not raise when nobody listens or the transport is down."""

    @abstractmethod
    async def subscribe(self, subject: str, type_: type[T]) -> Subscription[T]:
        """Receive events published from now on to subjects matching `subject`, as `type_`."""

    @abstractmethod
    async def close(self) -> None:
        """Release the plane's resources (and its connection, if it owns one)."""


class _MemorySubscription(Subscription[T]):
    def __init__(self, plane: MemoryEventPlane, subject: str, type_: type[T], max_pending: int):
        super().__init__(subject, type_)
        self._plane = plane
        self._items: deque[bytes | None] = deque()
        self._max_pending = max_pending
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def _deliver(self, data: bytes | None) -> None:
        if data is not None and len(self._items) >= self._max_pending:
            self._items.popleft()
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:  # 1, 2, 4, 8, ...: do not flood the log
                log.warning(
                    "event plane: subscriber of %r is behind; %d events dropped",
                    self.subject,
                    self.dropped,
                )
        self._items.append(data)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _next_raw(self) -> bytes | None:
        while not self._items:
            if self._closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.popleft()

    async def unsubscribe(self) -> None:
        if not self._closed:
            self._closed = True
            self._plane._subs.discard(self)
            self._deliver(None)


class MemoryEventPlane(EventPlane):
    """Pub/sub inside one process (embedded mode). Events are still encoded once per publish
    and decoded per subscriber, so types are checked as over NATS and nobody shares mutable
    objects across components."""

    def __init__(self, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.max_pending = max_pending
        self._subs: set[_MemorySubscription[Any]] = set()

    async def publish(self, subject: str, event: Any) -> None:
        data = encode_event(event)
        for sub in self._subs:
            if subject_matches(sub.subject, subject):
                sub._deliver(data)

    async def subscribe(self, subject: str, type_: type[T]) -> Subscription[T]:
        sub = _MemorySubscription(self, subject, type_, self.max_pending)
        self._subs.add(sub)
        return sub

    async def close(self) -> None:
        for sub in list(self._subs):
            await sub.unsubscribe()
