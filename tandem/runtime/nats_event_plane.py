"""The event plane over NATS core pub/sub (no JetStream: events are fire-and-forget).

nats-py re-subscribes after a reconnect by itself; events published while NATS is unreachable
are buffered by the client up to its pending limit and then dropped (logged), which is the
at-most-once contract of `event_plane`.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import nats.errors
from nats.aio.subscription import Subscription as NatsSub

from tandem.runtime.event_plane import (
    DEFAULT_MAX_PENDING,
    EventPlane,
    Subscription,
    encode_event,
)
from tandem.runtime.nats_client import NatsConnection

log = logging.getLogger(__name__)

T = TypeVar("T")


class _NatsSubscription(Subscription[T]):
    def __init__(self, sub: NatsSub, subject: str, type_: type[T]) -> None:
        super().__init__(subject, type_)
        self._sub = sub
        self._messages = sub.messages
        self._closed = False

    async def _next_raw(self) -> bytes | None:
        if self._closed:
            return None
        try:
            msg = await self._messages.__anext__()
        except StopAsyncIteration:
            return None
        return msg.data

    async def unsubscribe(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                await self._sub.unsubscribe()
            except nats.errors.Error as exc:
                log.debug("event plane: unsubscribe %r: %s", self.subject, exc)


class NatsEventPlane(EventPlane):
    def __init__(
        self,
        conn: NatsConnection,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        owns_connection: bool = False,
    ) -> None:
        self._conn = conn
        self.max_pending = max_pending
        self._owns_connection = owns_connection
        self._failures = 0

    @classmethod
    async def connect(cls, url: str) -> NatsEventPlane:
        conn = await NatsConnection.connect(url, name="tandem-events")
        return cls(conn, owns_connection=True)

    async def publish(self, subject: str, event: Any) -> None:
        try:
            await self._conn.nc.publish(subject, encode_event(event))
            self._failures = 0
        except nats.errors.Error as exc:
            self._failures += 1
            if self._failures & (self._failures - 1) == 0:
                log.warning(
                    "event plane: publish to %r failed (%d so far): %s",
                    subject,
                    self._failures,
                    exc,
                )

    async def subscribe(self, subject: str, type_: type[T]) -> Subscription[T]:
        sub = await self._conn.nc.subscribe(subject, pending_msgs_limit=self.max_pending)
        return _NatsSubscription(sub, subject, type_)

    async def close(self) -> None:
        if self._owns_connection:
            await self._conn.close()
