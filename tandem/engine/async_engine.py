"""The asyncio face of the engine: `generate()` streams, `abort()` cancels, `stats()` reports.

The step loop runs in its own thread so the event loop stays responsive while the model
computes (torch releases the GIL in its kernels). Requests and aborts reach the loop through
a thread-safe queue; outputs come back to each request's asyncio.Queue through its event
loop's `LoopMailbox`: one hop per step for all requests, or fewer when steps outrun the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.engine.kv_event_buffer import KV_EVENT_BUFFER, KvEventBuffer
from tandem.engine.kv_handoff import KvSource
from tandem.engine.mailbox import LoopMailbox
from tandem.protocol import (
    GenerateOutput,
    GenerateRequest,
    KvEvent,
    KvSnapshot,
    KvTransferParams,
    LoadStats,
    coalesce,
)
from tandem.protocol.observations import StepSample

log = logging.getLogger(__name__)

#: How long an imported request waits for free blocks before computing its prompt here.
IMPORT_ROOM_WAIT = 2.0
#: How long a call into the engine thread (snapshot, export touch/release, import steps) may
#: wait for its answer: it runs between two steps, so this only passes if the loop is wedged.
CALL_TIMEOUT = 30.0


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
        self._streams: dict[str, tuple[LoopMailbox, asyncio.Queue]] = {}
        self._mailboxes: dict[asyncio.AbstractEventLoop, LoopMailbox] = {}
        self._stats = self.core.stats()
        self._kv_events = KvEventBuffer(KV_EVENT_BUFFER)
        self._stopped = threading.Event()
        self.error: BaseException | None = None
        self.kv_layout = self.core.kv_layout
        self.kv_transfer_timeout = 10.0
        self.call_timeout = CALL_TIMEOUT
        self._tasks: set[asyncio.Task] = set()
        # Futures of `_in_engine` calls not answered yet, failed if the loop ends; and who
        # wants to hear of the loop's death. Both guarded by `_state_lock` against the loop.
        self._pending: set[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = set()
        self._death_callbacks: list[Callable[[BaseException], None]] = []
        self._state_lock = threading.Lock()
        self._ended = False  # the loop returned (died or shut down)
        self._thread = threading.Thread(target=self._loop, name="tandem-engine", daemon=True)
        self._thread.start()

    # -- public API ----------------------------------------------------------------

    async def generate(
        self, request: GenerateRequest, kv_source: KvSource | None = None
    ) -> AsyncIterator[GenerateOutput]:
        """Stream outputs until every one of the request's `n` sequences has finished (or,
        for a `kv_export` request, until its KV is handed over in `kv_transfer`).

        Raises ValueError before yielding anything if the request can never be served;
        leaving early (break, cancellation, a client gone) aborts it. A `kv_import` request
        pulls its blocks from `kv_source`, or computes its prompt here if that fails (logged).
        """
        if self._ended:
            raise self._dead_error()
        self.core.validate(request)
        if request.kv_import is not None and kv_source is None:
            raise ValueError("this worker cannot import KV caches (it has no transfer source)")
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already running")
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request.request_id] = (self._mailbox(), outputs)
        if self._ended:  # the loop ended after the check above: nobody would answer
            self._streams.pop(request.request_id, None)
            raise self._dead_error()
        self._commands.put(("add", request))
        remaining = request.sampling.n
        try:
            if request.kv_import is not None:
                await self._import(request.request_id, request.kv_import, kv_source)
            while remaining:
                items = [await outputs.get()]  # and what queued behind it, merged (`coalesce`)
                while not outputs.empty() and not isinstance(items[-1], BaseException):
                    items.append(outputs.get_nowait())
                error = items.pop() if isinstance(items[-1], BaseException) else None
                for out in coalesce(items):
                    if out.finish_reason is not None or out.kv_transfer is not None:
                        remaining -= 1
                    yield out
                if error is not None:
                    raise error
        finally:
            self._streams.pop(request.request_id, None)
            if remaining:
                self.abort(request.request_id)

    def _mailbox(self) -> LoopMailbox:
        """The running loop's mailbox (those of closed loops are dropped on the way)."""
        loop = asyncio.get_running_loop()
        box = self._mailboxes.get(loop)
        if box is None:
            for old in [lp for lp in self._mailboxes if lp.is_closed()]:
                del self._mailboxes[old]
            box = self._mailboxes[loop] = LoopMailbox(loop)
        return box

    async def release_export(self, request_id: str) -> int:
        """Free the blocks an exported request holds; how many there were (0: none left)."""
        return await self._in_engine(self.core.handoff.release_export, request_id)

    async def touch_export(self, request_id: str) -> list[int]:
        """An exported request's blocks, kept for another full hold (a pull is starting);
        KeyError if they were released or expired."""
        return await self._in_engine(self.core.handoff.touch_export, request_id)

    def kv_caches(self) -> tuple[Any, Any] | None:
        """The K and V cache tensors (None for the mock engine). Blocks held for export are
        never written, so a transfer may read them from another thread."""
        return self.core.kv_caches()

    async def _import(self, rid: str, params: KvTransferParams, source: KvSource) -> None:
        """Reserve blocks, pull the KV into them, start decoding; on failure prefill here."""
        loop = asyncio.get_running_loop()
        try:
            give_up = loop.time() + IMPORT_ROOM_WAIT
            while (plan := await self._in_engine(self.core.handoff.reserve_import, rid)) is None:
                if loop.time() > give_up:
                    raise TimeoutError(f"no free KV blocks within {IMPORT_ROOM_WAIT:.0f} s")
                await asyncio.sleep(0.005)
            indices, dst = plan
            started = time.perf_counter()
            payload = await asyncio.wait_for(
                source.fetch(params, indices, dst), self.kv_transfer_timeout
            )
            modelled = self.core.handoff.modelled_transfer_s(len(indices))
            if modelled > 0:  # the mock engine: the transfer takes the time its model says
                await asyncio.sleep(max(0.0, modelled - (time.perf_counter() - started)))
            await self._in_engine(self.core.handoff.finish_import, rid, payload, dst)
        except (asyncio.CancelledError, EngineDeadError):
            raise  # the dead loop fails the stream too; nothing to fall back on
        except Exception as exc:
            log.warning(
                "request %s: KV transfer from worker %s failed (%s: %s); computing the prompt"
                " here instead",
                rid,
                params.worker_id or "?",
                type(exc).__name__,
                exc,
            )
            self._commands.put(("call", (self.core.handoff.fallback_import, (rid,), None, None)))
        finally:
            task = loop.create_task(source.release(params))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _in_engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` in the engine thread between steps; its result or its exception.
        EngineDeadError if the loop is dead or dies first; TimeoutError after `call_timeout`
        seconds (a wedged loop)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        entry = (loop, future)
        with self._state_lock:
            if self._ended:
                raise self._dead_error()
            self._pending.add(entry)
        try:
            self._commands.put(("call", (fn, args, loop, future)))
            async with asyncio.timeout(self.call_timeout) as scope:
                return await future
        except TimeoutError:
            if not scope.expired():
                raise  # the call's own TimeoutError
            raise TimeoutError(
                f"the engine did not run {getattr(fn, '__name__', fn)} within"
                f" {self.call_timeout:.0f} s"
            ) from None
        finally:
            with self._state_lock:
                self._pending.discard(entry)

    @property
    def alive(self) -> bool:
        """False once the step loop died (or was shut down)."""
        return not self._ended

    def on_death(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(error)` once when the step loop dies (at once if it is dead). It
        runs in the engine thread: hand it to your event loop with `call_soon_threadsafe`.
        A shutdown is no death: callbacks are not called for it."""
        with self._state_lock:
            if not self._ended:
                self._death_callbacks.append(callback)
                return
            error = self.error
        if error is not None:
            callback(error)

    def _dead_error(self) -> EngineDeadError:
        if self.error is None:
            return EngineDeadError("the engine was shut down")
        return EngineDeadError(f"engine loop died: {self.error}")

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop a request (or only its sequence `index`) and free the blocks; harmless if it
        already finished. A frontend whose stop string ended one of `n` sequences stops just
        that one."""
        if self._ended:  # nobody would take the command off the queue
            return
        self._commands.put(("abort", (request_id, index)))

    def stats(self) -> LoadStats:
        return self._stats

    def take_step_samples(self) -> list[StepSample]:
        """The engine's steps since the last call (for the planner's step model)."""
        return self.core.take_step_samples()

    def take_kv_events(self) -> list[KvEvent]:
        return self._kv_events.take()

    @property
    def kv_events_dropped(self) -> int:
        return self._kv_events.dropped

    async def kv_snapshot(self) -> KvSnapshot:
        """The prefix cache's blocks, taken between steps in the engine thread so that it
        agrees with the event ids (every event up to `last_event_id` is already buffered for
        `take_kv_events`)."""
        return await self._in_engine(self._snapshot)

    def _snapshot(self) -> KvSnapshot:
        self._publish()
        return self.core.block_manager.snapshot()

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
                for rid in self.core.handoff.expire_exports():
                    log.warning("request %s: no decode worker took its KV in time; freed", rid)
                outputs = self.core.step() if self.core.has_work() else []
                self._publish()  # before delivering: a caller that sees an output sees its stats
                self._deliver(outputs)
        except BaseException as exc:
            log.exception("engine loop died")
            self._end(exc)
        else:
            self._end(None)

    def _end(self, exc: BaseException | None) -> None:
        """The loop is over: fail every stream and pending call; tell who asked (a death)."""
        with self._state_lock:
            self.error = exc
            self._ended = True
            pending, self._pending = self._pending, set()
            callbacks, self._death_callbacks = self._death_callbacks, []
        dead = self._dead_error()
        for loop, future in pending:
            with contextlib.suppress(RuntimeError):  # that event loop is closed
                loop.call_soon_threadsafe(_resolve_error, future, dead)
        self._fail_all(dead)
        if exc is None:
            return
        for callback in callbacks:
            try:
                callback(exc)
            except Exception:
                log.exception("engine death callback failed")

    def _apply_commands(self, block: bool) -> bool:
        """Run queued commands; wait for one when idle (until the next export deadline at
        most). False means stop."""
        while True:
            timeout = None
            if block and (deadline := self.core.handoff.next_export_deadline()) is not None:
                timeout = max(0.0, deadline - time.monotonic())
            try:
                kind, arg = self._commands.get(block=block, timeout=timeout)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "call":
                self._call(*arg)
            elif kind == "add":
                # One request's failure is that request's, never the loop's: whatever
                # add_request raises goes to its stream, and what it half-added is taken out.
                rid = getattr(arg, "request_id", None)
                rid = rid if isinstance(rid, str) else None
                before = self.core.requests.get(rid) if rid is not None else None
                try:
                    self.core.add_request(arg)
                except Exception as exc:
                    if not isinstance(exc, ValueError):
                        log.exception("request %s could not be added", rid)
                    if rid is not None and self.core.requests.get(rid) is not before:
                        with contextlib.suppress(Exception):
                            self.core.abort(rid)
                        self.core.requests.pop(rid, None)
                    self._deliver_to(rid, exc)
            else:
                self._deliver(self.core.abort(*arg))

    def _call(self, fn: Callable[..., Any], args: tuple, loop: Any, future: Any) -> None:
        try:
            result: Any = fn(*args)
        except Exception as exc:  # the caller's failure, not the engine's
            if future is None:
                log.exception("engine call %s failed", getattr(fn, "__name__", fn))
                return
            loop.call_soon_threadsafe(_resolve_error, future, exc)
            return
        self._publish()  # before the caller resumes: its next stats() sees this call
        if future is not None:
            loop.call_soon_threadsafe(_resolve, future, result)

    def _publish(self) -> None:
        self._stats = self.core.stats()
        self._kv_events.put(self.core.take_kv_events())

    def _deliver(self, outputs: list[GenerateOutput]) -> None:
        by_box: dict[LoopMailbox, list[tuple[asyncio.Queue, object]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_box.setdefault(stream[0], []).append((stream[1], out))
        for box, items in by_box.items():
            box.post(items)

    def _deliver_to(self, request_id: str, item: object) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream[0].post([(stream[1], item)])

    def _fail_all(self, exc: BaseException) -> None:
        for request_id in list(self._streams):
            self._deliver_to(request_id, exc)


def _resolve(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def _resolve_error(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
