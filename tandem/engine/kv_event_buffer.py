"""The KV events an engine produced, kept until the worker's publisher takes them."""

from __future__ import annotations

import logging
import threading
from collections import deque

from tandem.protocol import KvEvent

log = logging.getLogger(__name__)

#: Events kept for the publisher by default.
KV_EVENT_BUFFER = 10_000


class KvEventBuffer:
    """Bounded and thread-safe: untaken (embedded, or a publisher behind), the oldest events
    go, and a consumer then sees a gap in the event ids and fetches a snapshot (DESIGN.md)."""

    def __init__(self, limit: int = KV_EVENT_BUFFER) -> None:
        self._events: deque[KvEvent] = deque(maxlen=limit)
        self._lock = threading.Lock()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._events)

    def put(self, events: list[KvEvent]) -> None:
        if not events:
            return
        with self._lock:
            overflow = len(self._events) + len(events) - (self._events.maxlen or 0)
            self._events.extend(events)
        if overflow > 0:
            if self.dropped == 0:
                log.info("nobody takes the engine's KV events: keeping the newest %d",
                         self._events.maxlen)  # fmt: skip
            self.dropped += overflow

    def take(self) -> list[KvEvent]:
        with self._lock:
            events = list(self._events)
            self._events.clear()
        return events
