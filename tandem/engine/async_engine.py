"""The asyncio face of the engine: `generate()` streams, `abort()` cancels, `stats()` reports.

The step loop runs in its own thread so the event loop stays responsive while the model
computes (torch releases the GIL in its kernels). Requests and aborts reach the loop through
a thread-safe queue; outputs come back to each request's asyncio.Queue through
`call_soon_threadsafe`, one hop per step for all requests.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.protocol import GenerateOutput, GenerateRequest, KvEvent, KvSnapshot, LoadStats

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step loop crashed; every in-flight request ends with this error."""


class AsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.core = EngineCore(config)
        self.model_path = config.model
        self.max_model_len = self.core.max_model_len
        self.max_logprobs = config.max_logprobs
        self.block_size = config.block_size
        self.eos_token_ids = set(self.core.eos_token_ids)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats = self.core.stats()
        self._kv_events: list[KvEvent] = []
        self._events_lock = threading.Lock()
        self._stopped = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="tandem-engine", daemon=True)
        self._thread.start()

    # -- public API ----------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Stream outputs until every one of the request's `n` sequences has finished.

        Raises ValueError before yielding anything if the request can never be served.
        Leaving the loop early (break, cancellation, a client gone) aborts the request.
        """
        if self.error is not None:
            raise EngineDeadError(f"engine loop died: {self.error}")
        self.core.validate(request)
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already running")
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request.request_id] = (asyncio.get_running_loop(), outputs)
        self._commands.put(("add", request))
        remaining = request.sampling.n
        try:
            while remaining:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    raise out
                if out.finish_reason is not None:
                    remaining -= 1
                yield out
        finally:
            self._streams.pop(request.request_id, None)
            if remaining:
                self.abort(request.request_id)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop a request (or only its sequence `index`) and free the blocks; harmless if it
        already finished. A frontend whose stop string ended one of `n` sequences stops just
        that one."""
        self._commands.put(("abort", (request_id, index)))

    def stats(self) -> LoadStats:
        return self._stats

    def take_kv_events(self) -> list[KvEvent]:
        with self._events_lock:
            events, self._kv_events = self._kv_events, []
        return events

    async def kv_snapshot(self) -> KvSnapshot:
        """The prefix cache's blocks, taken between steps in the engine thread so that it
        agrees with the event ids (every event up to `last_event_id` is already buffered for
        `take_kv_events`)."""
        if self.error is not None:
            raise EngineDeadError(f"engine loop died: {self.error}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[KvSnapshot] = loop.create_future()
        self._commands.put(("snapshot", (loop, future)))
        return await future

    def shutdown(self) -> None:
        self._stopped.set()
        self._commands.put(("stop", None))
        self._thread.join(timeout=10)

    # -- the step loop (engine thread) ---------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                block = not self.core.has_work()
                if not self._apply_commands(block):
                    break
                outputs = self.core.step() if self.core.has_work() else []
                self._publish()  # before delivering: a caller that sees an output sees its stats
                self._deliver(outputs)
        except BaseException as exc:
            log.exception("engine loop died")
            self.error = exc
            self._fail_all(EngineDeadError(f"engine loop died: {exc}"))

    def _apply_commands(self, block: bool) -> bool:
        """Run queued adds and aborts; wait for one when idle. False means stop."""
        while True:
            try:
                kind, arg = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "snapshot":
                self._publish()
                loop, future = arg
                snap = self.core.block_manager.snapshot()
                loop.call_soon_threadsafe(_resolve, future, snap)
            elif kind == "add":
                try:
                    self.core.add_request(arg)
                except ValueError as exc:
                    self._deliver_to(arg.request_id, exc)
            else:
                self._deliver(self.core.abort(*arg))

    def _publish(self) -> None:
        self._stats = self.core.stats()
        events = self.core.take_kv_events()
        if events:
            with self._events_lock:
                self._kv_events.extend(events)

    def _deliver(self, outputs: list[GenerateOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _deliver_to(self, request_id: str, item: object) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream[0].call_soon_threadsafe(_put_all, [(stream[1], item)])

    def _fail_all(self, exc: BaseException) -> None:
        for request_id in list(self._streams):
            self._deliver_to(request_id, exc)


def _resolve(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)
