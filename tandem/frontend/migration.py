"""Request migration: a stream whose worker is lost goes on on another worker.

The request is sent again with the tokens streamed so far (`output_token_ids`); the new
worker recomputes their KV and generates the rest, so the client sees every token once and
greedy or seeded output is what it would have been. A request of `n` sequences goes on as
one request per unfinished sequence (`sequence_index` keeps its noise stream and the index
of its outputs), merged back into one stream. Each part may migrate again, up to the limit.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import msgspec

from tandem.frontend.streams import merge_streams
from tandem.protocol import GenerateOutput, GenerateRequest
from tandem.router.pool import NoWorkers

log = logging.getLogger(__name__)

#: Times a request may move to another worker when its worker is lost (Dynamo's default).
MIGRATION_LIMIT = 3

Start = Callable[[GenerateRequest], AsyncIterator[GenerateOutput]]


class WorkerLost(RuntimeError):
    """The worker serving a stream died or failed mid-stream."""


class Migration:
    """Runs requests through `start` (one attempt on one worker), migrating lost ones."""

    def __init__(self, start: Start, limit: int = MIGRATION_LIMIT) -> None:
        if limit < 0:
            raise ValueError(f"migration_limit must be >= 0, got {limit}")
        self.start = start
        self.limit = limit
        self.count = 0  # migrations so far
        self._parts: dict[str, dict[int, str]] = {}  # split request -> index -> its part's id

    def parts(self, request_id: str, index: int | None = None) -> list[str]:
        """The ids a split request runs as now (all of them, or sequence `index`'s)."""
        parts = self._parts.get(request_id, {})
        if index is None:
            return list(parts.values())
        return [parts[index]] if index in parts else []

    async def generate(
        self, request: GenerateRequest, used: int = 0
    ) -> AsyncIterator[GenerateOutput]:
        """`used`: migrations this request had already (a part of a split one)."""
        streamed: dict[int, list[int]] = {}  # tokens the caller has had, per sequence
        finished: set[int] = set()
        current, migrations, lost = request, used, ""
        while True:
            try:
                async with contextlib.aclosing(self.start(current)) as outputs:
                    async for out in outputs:
                        streamed.setdefault(out.index, []).extend(out.token_ids)
                        if out.finish_reason is not None:
                            finished.add(out.index)
                        yield out
                return
            except NoWorkers as exc:
                if migrations == 0:
                    raise
                lost = lost or "its worker was lost"
                raise WorkerLost(f"{lost}; no other worker can take the request: {exc}") from exc
            except WorkerLost as exc:
                if migrations >= self.limit:
                    raise
                lost, migrations = str(exc), migrations + 1
                self.count += 1
                log.warning(
                    "request %s: %s; migrating it with %d streamed tokens (migration %d of %d)",
                    request.request_id, exc, sum(map(len, streamed.values())), migrations,
                    self.limit,
                )  # fmt: skip
            if request.sampling.n > 1:
                unfinished = [i for i in range(request.sampling.n) if i not in finished]
                async for out in self._split(request, unfinished, streamed, migrations):
                    yield out
                return
            current = _resumed(request, streamed.get(request.sequence_index, []))
            if current is None:  # every token was streamed: only the end was lost
                yield _ended(request)
                return

    async def _split(
        self,
        request: GenerateRequest,
        indices: list[int],
        streamed: dict[int, list[int]],
        used: int,
    ) -> AsyncIterator[GenerateOutput]:
        """The unfinished sequences of a request of n, each as a request of its own."""
        rid = request.request_id
        single = msgspec.structs.replace(request.sampling, n=1)
        parts = {i: msgspec.structs.replace(request, request_id=f"{rid}/seq{i}", sampling=single,
                                            sequence_index=i) for i in indices}  # fmt: skip
        self._parts[rid] = {i: part.request_id for i, part in parts.items()}
        streams = []
        for i, part in parts.items():
            resumed = _resumed(part, streamed.get(i, []))
            streams.append(self.generate(resumed, used) if resumed else _one(_ended(part)))
        try:
            async with contextlib.aclosing(merge_streams(streams)) as merged:
                async for _, out in merged:
                    out.request_id = rid
                    yield out
        finally:
            self._parts.pop(rid, None)


def _resumed(request: GenerateRequest, streamed: list[int]) -> GenerateRequest | None:
    """The request to send a new worker after `streamed` tokens (None: nothing is left)."""
    outputs = request.output_token_ids + streamed
    if len(outputs) >= request.sampling.max_tokens:
        return None
    return msgspec.structs.replace(
        request, kv_export=False, kv_import=None, output_token_ids=outputs
    )


def _ended(request: GenerateRequest) -> GenerateOutput:
    return GenerateOutput(request_id=request.request_id, index=request.sequence_index,
                          finish_reason="length",
                          num_prompt_tokens=len(request.prompt_token_ids))  # fmt: skip


async def _one(out: GenerateOutput) -> AsyncIterator[GenerateOutput]:
    yield out
