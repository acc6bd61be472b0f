"""The event loop every Tandem process runs: uvloop where it is installed.

Each streamed token costs a few event-loop callbacks and socket writes in the frontend and
the worker; uvloop runs them in C. Windows has no uvloop: the standard loop serves there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

try:
    import uvloop
except ImportError:  # Windows
    uvloop = None

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on a uvloop loop when uvloop is installed."""
    factory = uvloop.new_event_loop if uvloop is not None else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
