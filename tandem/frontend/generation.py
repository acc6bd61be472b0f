"""One API request's generation: engine token streams in, per-choice text deltas out.

This is where token ids become text (incremental detokenisation), stop strings end choices
(and abort the engine's work), usage is counted exactly, and latency metrics are taken. The
routes in `server.py` only format what comes out, as SSE chunks or one JSON body, so chat
and completions, streaming or not, share every rule here.

Cleanup is explicit: `aclose()` aborts every engine request not yet finished (the engine's
abort is idempotent) before closing iterators, so a client that goes away frees its KV
blocks even when cancellation interrupts the asynchronous part of the cleanup.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tandem.frontend.admission import AdmissionControl
from tandem.frontend.detokenizer import IncrementalDetokenizer, StopStringMatcher
from tandem.frontend.engine_client import EngineClient
from tandem.frontend.metrics import FrontendMetrics, RequestTimer
from tandem.frontend.preprocess import Prepared
from tandem.frontend.streams import aclose_stream, merge_streams
from tandem.http.errors import APIError
from tandem.protocol import GenerateOutput, GenerateRequest, TokenLogprob


class EngineStreamError(Exception):
    """The engine failed a request after it started: reported in-stream or as a 5xx body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ChoiceDelta:
    """New text (and the logprobs of the tokens behind it) for one choice."""

    index: int
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None


@dataclass
class _Choice:
    index: int
    prompt: int
    detok: IncrementalDetokenizer
    stop: StopStringMatcher
    num_tokens: int = 0
    finish_reason: str | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)


class GenerationRun:
    """Drives the engine request(s) of one API call and turns outputs into ChoiceDeltas.

    Use: `await start()` (raises APIError for requests the engine refuses, so the route can
    still answer 4xx), then iterate `deltas()`, then read `usage()`; always `aclose()`.
    """

    def __init__(
        self,
        engine: EngineClient,
        tokenizer: Any,
        metrics: FrontendMetrics,
        admission: AdmissionControl,
        request_id: str,
        prepared: Prepared,
        timer: RequestTimer,
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._admission = admission
        self.request_id = request_id
        self.prepared = prepared
        self.n = prepared.sampling.n
        prompts = prepared.prompts
        # One engine request per prompt; a single prompt keeps the API request's id.
        self.engine_ids = (
            [request_id]
            if len(prompts) == 1
            else [f"{request_id}-{i}" for i in range(len(prompts))]
        )
        self.choices = [
            _Choice(
                index=p * self.n + i,
                prompt=p,
                detok=IncrementalDetokenizer(
                    tokenizer, prompt, skip_special_tokens=prepared.skip_special_tokens
                ),
                stop=StopStringMatcher(prepared.stop),
            )
            for p, prompt in enumerate(prompts)
            for i in range(self.n)
        ]
        self.prompt_tokens = sum(len(p) for p in prompts)
        self._cached = [0] * len(prompts)
        self._engine_finished = [0] * len(prompts)  # finish reasons the engine sent, per prompt
        self._timer = timer
        self._stream = self._raw_outputs()
        self._first: tuple[int, GenerateOutput] | None = None
        self._deltas: AsyncIterator[ChoiceDelta] | None = None

    # -- engine side -----------------------------------------------------------------

    async def _raw_outputs(self) -> AsyncIterator[tuple[int, GenerateOutput]]:
        requests = [
            GenerateRequest(request_id=rid, prompt_token_ids=p, sampling=self.prepared.sampling)
            for rid, p in zip(self.engine_ids, self.prepared.prompts, strict=True)
        ]
        if len(requests) == 1:
            stream = self._engine.generate(requests[0])
            try:
                async for out in stream:
                    yield 0, out
            finally:
                await aclose_stream(stream)
        else:
            merged = merge_streams([self._engine.generate(r) for r in requests])
            try:
                async for item in merged:
                    yield item
            finally:
                await aclose_stream(merged)

    async def _next_output(self) -> tuple[int, GenerateOutput] | None:
        try:
            p, out = await anext(self._stream)
        except StopAsyncIteration:
            return None
        self._admission.started(self.request_id)
        self._timer.on_tokens(p * self.n + out.index, len(out.token_ids))
        return p, out

    async def start(self) -> None:
        """Wait for the first output, so that a refusal can still become an HTTP error."""
        self._metrics.prompt_tokens.inc(self.prompt_tokens)
        try:
            self._first = await self._next_output()
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        except Exception as exc:
            raise APIError(503, f"the engine cannot serve this request: {exc}") from exc

    def _abort_unfinished(self) -> None:
        for p, rid in enumerate(self.engine_ids):
            if self._engine_finished[p] < self.n:
                self._engine.abort(rid)
                self._engine_finished[p] = self.n

    async def aclose(self) -> None:
        """Abort what still runs in the engine, then close the streams. Idempotent."""
        self._admission.ended(self.request_id)
        self._abort_unfinished()
        if self._deltas is not None:
            await aclose_stream(self._deltas)
        await aclose_stream(self._stream)

    # -- client side -----------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def deltas(self) -> AsyncIterator[ChoiceDelta]:
        self._deltas = self._iter_deltas()
        return self._deltas

    async def _iter_deltas(self) -> AsyncIterator[ChoiceDelta]:
        item, self._first = self._first, None
        while not self.finished:
            if item is None:
                try:
                    item = await self._next_output()
                except ValueError as exc:
                    raise EngineStreamError(400, str(exc)) from exc
                except Exception as exc:
                    raise EngineStreamError(500, f"the engine failed: {exc}") from exc
                if item is None:
                    break
            delta = self._process(*item)
            item = None
            if delta is not None:
                yield delta
        for c in self.choices:  # the engine's stream ended without finishing these
            if c.finish_reason is None:
                c.finish_reason = "abort"
                self._metrics.finished.labels(finish_reason="abort").inc()
                yield ChoiceDelta(c.index, c.stop.flush(), c.pending_logprobs, "abort")
        self._timer.on_finish()

    def _process(self, p: int, out: GenerateOutput) -> ChoiceDelta | None:
        if out.num_cached_tokens > self._cached[p]:
            self._cached[p] = out.num_cached_tokens
        if out.finish_reason is not None:
            self._engine_finished[p] += 1
        c = self.choices[p * self.n + out.index]
        if c.finish_reason is not None:
            return None  # ended by a stop string; the engine had not heard yet
        if out.finish_reason == "error":
            raise EngineStreamError(500, out.error or "the engine failed this request")
        tokens = out.token_ids
        c.num_tokens += len(tokens)
        if out.logprobs:
            c.pending_logprobs.extend(out.logprobs)
        # A stop token id ends the text; like EOS, its text is not part of the output.
        if out.stop_token_id is not None and tokens and tokens[-1] == out.stop_token_id:
            tokens = tokens[:-1]
        text = c.detok.push(tokens) if tokens else ""
        finish = out.finish_reason
        if finish is not None:
            text += c.detok.flush()
        emit = c.stop.push(text)
        if c.stop.stopped:
            finish = "stop"
        elif finish is not None:
            emit += c.stop.flush()
        if finish is not None:
            c.finish_reason = finish
            self._metrics.finished.labels(finish_reason=finish).inc()
            if out.finish_reason is None:
                self._stop_engine_if_done(p, out.index)
        if not emit and finish is None:
            return None  # keep logprobs until their text is released
        delta = ChoiceDelta(c.index, emit, c.pending_logprobs, finish)
        c.pending_logprobs = []
        return delta

    def _stop_engine_if_done(self, p: int, index: int) -> None:
        """A stop string ended choice `index` of prompt `p`: stop that engine sequence, or the
        whole engine request once all of its choices have ended."""
        if self._engine_finished[p] >= self.n:
            return
        mine = self.choices[p * self.n : (p + 1) * self.n]
        if all(c.finish_reason is not None for c in mine):
            self._engine.abort(self.engine_ids[p])
            self._engine_finished[p] = self.n
        else:
            self._engine.abort(self.engine_ids[p], index)

    def usage(self) -> dict[str, Any]:
        completion = sum(c.num_tokens for c in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": sum(self._cached)},
        }
