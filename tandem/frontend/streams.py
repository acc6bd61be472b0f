"""Async iteration over engine output streams: closing them, merging several into one,
reading a worker's with a timeout and with what already arrived coalesced."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from tandem.protocol import GenerateOutput, coalesce
from tandem.runtime import ResponseStream


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


class OutputTimeout(Exception):
    """A worker stream sent nothing for `seconds`."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no output within {seconds:.0f} s")
        self.seconds = seconds


async def coalesced(
    stream: ResponseStream, out: GenerateOutput, timeout: float | None
) -> AsyncIterator[GenerateOutput]:
    """`out`, then the rest of the stream, what already arrived behind an output merged into
    it (`coalesce`): a frontend that falls behind catches up in fewer chunks. The end or an
    error that arrived behind held tokens comes after they are yielded."""
    while True:
        items, error = [out], None
        while stream.buffered():
            try:
                items.append(await anext(stream))
            except Exception as exc:
                error = exc
                break
        for merged in coalesce(items):
            yield merged
        if isinstance(error, StopAsyncIteration):
            return
        if error is not None:
            raise error
        try:
            out = await next_output(stream, timeout)
        except StopAsyncIteration:
            return


async def next_output(stream: ResponseStream, timeout: float | None) -> GenerateOutput:
    """The stream's next output; `OutputTimeout` after `timeout` seconds (None: wait)."""
    if timeout is None:
        return await anext(stream)
    try:
        async with asyncio.timeout(timeout) as scope:
            return await anext(stream)
    except TimeoutError:
        if scope.expired():
            raise OutputTimeout(timeout) from None
        raise  # the call's own deadline
