"""Items from the engine thread to an event loop's queues, one wake-up per batch."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable


class LoopMailbox:
    """What the engine thread has for one event loop's `asyncio.Queue`s.

    Each `call_soon_threadsafe` writes to the loop's wake-up pipe and the loop reads it back:
    a syscall on each side, per step. When steps come faster than the loop drains them (tiny
    models, the mock engine, many short steps), a post joins the batch already waiting
    instead of waking the loop again; order is kept, since one drain takes all.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, object]] = []
        self._lock = threading.Lock()

    def post(self, items: Iterable[tuple[asyncio.Queue, object]]) -> None:
        """Queue `(queue, item)` pairs for the loop (from any thread)."""
        with self._lock:
            wake = not self._items
            self._items.extend(items)
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody is left to read them
                with self._lock:
                    self._items.clear()

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)
