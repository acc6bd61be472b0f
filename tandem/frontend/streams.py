"""Async iteration over engine output streams: closing them, merging several into one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from tandem.protocol import GenerateOutput


async def aclose_stream(it: Any) -> None:
    """Close an async generator (or anything with `aclose`); other iterators need nothing."""
    close = getattr(it, "aclose", None)
    if close is not None:
        await close()


async def merge_streams(
    streams: list[AsyncIterator[GenerateOutput]],
) -> AsyncIterator[tuple[int, GenerateOutput]]:
    """Interleave several engine streams as (stream index, output), in arrival order."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator[GenerateOutput]) -> None:
        try:
            async for item in it:
                queue.put_nowait((i, item))
            queue.put_nowait((i, done))
        except Exception as exc:  # handed to the consumer, raised there
            queue.put_nowait((i, exc))
        finally:
            await aclose_stream(it)

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
