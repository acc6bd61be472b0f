"""`RemoteEngine`: the frontend's `EngineClient` for workers in other processes.

A `WorkerPool` (tandem.router) knows the live workers, their load and KV blocks, and picks
one per request with its router policy; this class proxies the token stream over the request
plane and tells the pool how the request goes (first token, end), which books its load.

Failure handling, and why:
* A worker that leaves discovery (drain or lease expiry) gets no new request from that moment;
  its in-flight streams continue (a draining worker finishes them).
* A call that fails before the worker produced anything (connection refused, worker shutting
  down) is retried on another worker: nothing was generated, so nothing can be duplicated.
* A worker that dies mid-stream ends the stream with `WorkerLost`, which the HTTP layer turns
  into an error response or SSE error event; no retry yet (request migration is a later issue).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from tandem.protocol import GenerateOutput, GenerateRequest, LoadStats
from tandem.protocol.worker import DEFAULT_NAMESPACE, GENERATE_ENDPOINT, ModelCard
from tandem.router.pool import NoWorkers, WorkerPool
from tandem.router.router import Policy
from tandem.runtime import (
    Discovery,
    EventPlane,
    PeerGone,
    RemoteError,
    RequestClient,
    ResponseStream,
)

log = logging.getLogger(__name__)

__all__ = ["NoWorkers", "RemoteEngine", "WorkerLost"]


class WorkerLost(RuntimeError):
    """The worker serving a stream died or failed mid-stream."""


class RemoteEngine:
    """An `EngineClient` over the workers found in discovery. `start()`, then
    `wait_for_workers()` before building the app (the card gives max_model_len)."""

    def __init__(
        self,
        discovery: Discovery,
        events: EventPlane,
        client: RequestClient,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        policy: Policy = "round_robin",
        router_options: dict[str, Any] | None = None,
    ) -> None:
        self.pool = WorkerPool(
            discovery,
            events,
            client,
            namespace=namespace,
            policy=policy,
            router_options=router_options,
        )
        self._client = client
        self.namespace = namespace
        self._streams: dict[str, ResponseStream] = {}

    @property
    def card(self) -> ModelCard | None:
        return self.pool.card

    @property
    def max_model_len(self) -> int:
        return self.pool.card.max_model_len if self.pool.card else 0

    @property
    def max_logprobs(self) -> int:
        return self.pool.card.max_logprobs if self.pool.card else 0

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.pool.start()

    async def wait_for_workers(self, n: int = 1, timeout: float | None = None) -> None:
        await self.pool.wait_for_workers(n, timeout)

    async def close(self) -> None:
        await self.pool.close()
        for stream in list(self._streams.values()):
            stream.cancel()

    # -- EngineClient --------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        rid = request.request_id
        tried: set[str] = set()
        try:
            while True:
                worker, _ = self.pool.select(request, tried)
                tried.add(worker.info.instance_id)
                stream = self._client.call(
                    worker.info.address, GENERATE_ENDPOINT, request, response_type=GenerateOutput
                )
                self._streams[rid] = stream
                try:
                    first = await anext(stream)
                except StopAsyncIteration:  # aborted before the first output
                    self._forget(rid, stream)
                    return
                except (PeerGone, RemoteError) as exc:
                    self._forget(rid, stream)
                    if isinstance(exc, PeerGone) or exc.code in ("shutdown", "overloaded"):
                        # Nothing was generated: safe to try another worker.
                        log.warning(
                            "worker %s at %s unavailable (%s); trying another",
                            worker.info.instance_id,
                            worker.info.address,
                            exc,
                        )
                        if isinstance(exc, PeerGone):
                            self.pool.suspect(worker.info.instance_id)
                        continue
                    raise _translate(exc) from exc
                except BaseException:
                    self._forget(rid, stream)
                    raise
                break
            worker.requests += 1
            self.pool.first_token(rid)
            try:
                yield first
                async for out in stream:
                    yield out
            except PeerGone as exc:
                log.error(
                    "worker %s at %s died while streaming request %s: %s",
                    worker.info.instance_id,
                    worker.info.address,
                    rid,
                    exc,
                )
                raise WorkerLost(
                    f"the worker serving this request ({worker.info.instance_id}) died mid-stream"
                ) from exc
            except RemoteError as exc:
                raise WorkerLost(
                    f"the worker serving this request ({worker.info.instance_id}) failed: {exc}"
                ) from exc
            finally:
                self._forget(rid, stream)
        finally:
            self.pool.finish(rid)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Cancel the request's stream: the worker's handler is cancelled and aborts it.

        A stream can only be cancelled whole, so aborting one sequence of `n` (`index`) is a
        no-op here: that sequence runs to its own end on the worker and the frontend, which
        already ended its choice, drops its outputs.
        """
        if index is not None:
            return
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.cancel()

    def stats(self) -> LoadStats:
        return self.pool.stats()

    # -- introspection (/health) -----------------------------------------------------------

    @property
    def error(self) -> str | None:
        return self.pool.error

    def describe(self) -> list[dict[str, Any]]:
        return self.pool.describe()

    def metrics_collectors(self) -> list[Any]:
        from tandem.router.metrics import RouterCollector

        return [RouterCollector(self.pool)]

    def _forget(self, rid: str, stream: ResponseStream) -> None:
        if self._streams.get(rid) is stream:
            del self._streams[rid]
        stream.cancel()


def _translate(exc: RemoteError) -> Exception:
    """A worker's refusal of an invalid request becomes ValueError, as from a local engine."""
    message = str(exc)
    prefix = "ValueError: "
    if message.startswith(prefix):
        return ValueError(message[len(prefix) :])
    return WorkerLost(f"the worker failed this request: {message}")
