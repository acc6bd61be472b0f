"""The OpenAI-compatible HTTP server: routes, authentication, streaming and disconnects.

`build_app` wires an `EngineClient` (in-process engine, remote worker, router...) to FastAPI.
The routes parse and validate (`preprocess`), admit (`admission`), drive the engine
(`generation`) and format (`responses`); this module owns only the HTTP concerns: SSE and
turning failures into OpenAI-shaped errors (the key, body-size and disconnect guards are
`tandem.http.guards`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask

from tandem.frontend.admission import AdmissionControl, ClientRate
from tandem.frontend.engine_client import EngineClient
from tandem.frontend.generation import EngineStreamError, GenerationRun
from tandem.frontend.metrics import FrontendMetrics, RequestCounterMiddleware, RequestTimer
from tandem.frontend.openai_types import ChatCompletionRequest, CompletionRequest, StreamOptions
from tandem.frontend.preprocess import Prepared, Preprocessor, check_model
from tandem.frontend.responses import (
    SSE_DONE,
    ChatFormatter,
    CompletionFormatter,
    TokenTexts,
    error_event,
    json_bytes,
    sse,
)
from tandem.http.errors import APIError, from_validation_errors, install_handlers
from tandem.http.guards import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    ClientDisconnected,
    until_disconnected,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# Status logged for requests whose client left before the answer (nginx's convention).
CLIENT_CLOSED_REQUEST = 499

#: Largest request body accepted; beyond it a 413 before any parsing or tokenizing.
MAX_REQUEST_BYTES = 8 * 1024 * 1024


def _parse(model: type[M], body: bytes) -> M:
    if not body.strip():
        raise APIError(
            400, "The request body is empty; expected a JSON object.", code="invalid_json"
        )
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from exc


class Frontend:
    """State shared by the routes of one app: engine, tokenizer, metrics, admission."""

    def __init__(
        self,
        engine: EngineClient,
        tokenizer: Any,
        served_model_name: str,
        max_waiting: int,
        max_client_rate: float = 0.0,
    ) -> None:
        self.engine = engine
        self.client_rate = ClientRate(max_client_rate) if max_client_rate > 0 else None
        self.tokenizer = tokenizer
        self.model = served_model_name
        self.created = int(time.time())
        self.metrics = FrontendMetrics(engine.stats)
        # An engine with more to report (a RemoteEngine's router) hands over its collectors.
        for collector in getattr(engine, "metrics_collectors", list)():
            self.metrics.registry.register(collector)
        self.admission = AdmissionControl(engine.stats, max_waiting)
        self.metrics.inflight_limit.set_function(lambda: self.admission.limit.limit)
        self.pre = Preprocessor(tokenizer, engine.max_model_len, engine.max_logprobs)
        self.texts = TokenTexts(tokenizer)
        # One thread: preprocessing leaves the event loop, and the tokenizer one caller.
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tandem-tokenize")

    def screen(self, request: Request) -> None:
        """The client's rate and a first admission check, before the body is read, so that
        an overloaded server spends nothing on it."""
        try:
            if self.client_rate is not None:
                self.client_rate.check(request.client.host if request.client else "?")
            self.admission.check()
        except APIError as exc:
            self.metrics.rejected.labels(exc.code).inc()
            raise

    async def prepare(self, fn: Callable[[Any], Prepared], req: Any) -> Prepared:
        """Template and tokenize off the event loop (a long prompt takes a while)."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, req)

    async def serve(
        self,
        request: Request,
        prepared: Prepared,
        *,
        stream: bool,
        stream_options: StreamOptions,
        chat: bool,
        timer: RequestTimer,
    ) -> Response:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        n = prepared.sampling.n
        num_choices = len(prepared.prompts) * n
        common = {
            "want_logprobs": prepared.sampling.logprobs is not None,
            "include_usage": stream_options.include_usage and stream,
        }
        fmt = (
            ChatFormatter(rid, self.model, self.texts, num_choices, **common)
            if chat
            else CompletionFormatter(
                rid,
                self.model,
                self.texts,
                num_choices,
                echo_texts=prepared.echo_texts,
                n=n,
                **common,
            )
        )
        run = GenerationRun(
            self.engine, self.tokenizer, self.metrics, self.admission, rid, prepared, timer
        )
        try:
            self.admission.admit(rid, num_choices)
        except APIError as exc:
            self.metrics.rejected.labels(exc.code).inc()
            raise
        self.metrics.inflight.inc()
        handed_off = False
        try:
            # Headers wait for the first output, so an engine that refuses the request (or a
            # remote one that cannot place it) still gets an HTTP error status, not a 200
            # stream that carries an error.
            await until_disconnected(request, run.start())
            if stream:
                body = self._sse(run, fmt, stream_options)
                handed_off = True
                return StreamingResponse(
                    body,
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                    background=BackgroundTask(self._finish_stream, body),
                )
            result = await until_disconnected(request, self._collect(run, fmt))
            return Response(json_bytes(result), media_type="application/json")
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except EngineStreamError as exc:
            raise APIError(exc.status, exc.message) from exc
        finally:
            if not handed_off:
                await run.aclose()
                self.metrics.inflight.dec()

    async def _collect(self, run: GenerationRun, fmt: Any) -> dict[str, Any]:
        async for d in run.deltas():
            fmt.add(d)
        return fmt.body(run.usage())

    async def _sse(
        self, run: GenerationRun, fmt: Any, options: StreamOptions
    ) -> AsyncGenerator[bytes, None]:
        try:
            for choice in fmt.opening():  # one choice per chunk, as OpenAI streams them
                yield sse(fmt.chunk([choice]))
            async for d in run.deltas():
                chunk = fmt.chunk([fmt.chunk_choice(d)])
                if options.continuous_usage_stats:
                    chunk["usage"] = run.usage()
                yield sse(chunk)
            if options.include_usage:
                yield sse(fmt.usage_chunk(run.usage()))
        except EngineStreamError as exc:
            log.warning("request %s failed mid-stream: %s", run.request_id, exc.message)
            yield sse(error_event(exc.status, exc.message))
        finally:
            # Runs on completion, on error, and when Starlette cancels us for a disconnect.
            await run.aclose()
        yield SSE_DONE

    async def _finish_stream(self, body: AsyncGenerator[bytes, None]) -> None:
        """After the response: if a disconnect left the body suspended, close it (abort)."""
        try:
            await body.aclose()
        finally:
            self.metrics.inflight.dec()


def _openapi_with_bodies(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> Callable[[], dict]:
    """`/openapi.json` with the request bodies of routes that parse them themselves (to
    name a bad field in an OpenAI-shaped error): clients and fuzzers see the real schema."""
    from fastapi.openapi.utils import get_openapi

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                                 routes=app.routes)  # fmt: skip
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for path, model in bodies.items():
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
                ref = {"$ref": f"#/components/schemas/{model.__name__}"}
                schema["paths"][path]["post"]["requestBody"] = {
                    "required": True, "content": {"application/json": {"schema": ref}}
                }  # fmt: skip
            app.openapi_schema = schema
        return app.openapi_schema

    return build


def build_app(
    engine: EngineClient,
    tokenizer_path: str,
    served_model_name: str,
    *,
    api_key: str | None = None,
    max_waiting: int = 256,
    max_request_bytes: int | None = MAX_REQUEST_BYTES,
    max_client_rate: float = 0.0,
) -> FastAPI:
    """An OpenAI-compatible app in front of `engine`.

    `tokenizer_path` is a Hugging Face folder with the tokenizer (and chat template) matching
    the engine's model; `max_waiting` bounds the engine's waiting queue before requests are
    refused with 503; bodies over `max_request_bytes` (None: no limit) get 413; a client
    address over `max_client_rate` generation requests a second (0: no limit) gets 429. The
    caller owns the engine and shuts it down.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    fe = Frontend(engine, tokenizer, served_model_name, max_waiting, max_client_rate)
    app = FastAPI(title="Tandem", summary="OpenAI-compatible LLM server")
    app.openapi = _openapi_with_bodies(
        app, {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
    )
    app.state.frontend = fe
    install_handlers(app)
    # Order matters (the last added is outermost): the counter also counts 401s and 413s;
    # the key is checked before a body is read.
    if max_request_bytes is not None:
        app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(RequestCounterMiddleware, metrics=fe.metrics)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        timer = RequestTimer(fe.metrics)
        fe.screen(request)
        req = _parse(ChatCompletionRequest, await request.body())
        check_model(req.model, fe.model)
        prepared = await fe.prepare(fe.pre.prepare_chat, req)
        return await fe.serve(
            request,
            prepared,
            stream=req.stream,
            stream_options=req.stream_options or StreamOptions(),
            chat=True,
            timer=timer,
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        timer = RequestTimer(fe.metrics)
        fe.screen(request)
        req = _parse(CompletionRequest, await request.body())
        check_model(req.model, fe.model)
        prepared = await fe.prepare(fe.pre.prepare_completion, req)
        return await fe.serve(
            request,
            prepared,
            stream=req.stream,
            stream_options=req.stream_options or StreamOptions(),
            chat=False,
            timer=timer,
        )

    def model_card() -> dict[str, Any]:
        return {
            "id": fe.model,
            "object": "model",
            "created": fe.created,
            "owned_by": "tandem",
            "max_model_len": fe.engine.max_model_len,
            "vocab_size": len(fe.tokenizer),  # lets load generators draw valid token ids
        }

    @app.get("/v1/models")
    async def list_models() -> Response:
        return Response(
            json_bytes({"object": "list", "data": [model_card()]}), media_type="application/json"
        )

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> Response:
        check_model(model, fe.model)
        return Response(json_bytes(model_card()), media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        """Open to load balancers, so it names no address: the workers are only counted."""
        # An engine that exposes `error` (AsyncEngine does) is unhealthy once its loop died.
        # A RemoteEngine's `error` is "no live workers"; its `describe()` lists the workers.
        error = getattr(fe.engine, "error", None)
        if error is not None:
            raise APIError(503, f"not serving: {error}")
        fe.engine.stats()
        body: dict[str, Any] = {"status": "ok"}
        if (describe := getattr(fe.engine, "describe", None)) is not None:
            body["workers"] = len(describe())
        return Response(json_bytes(body), media_type="application/json")

    @app.get("/v1/workers")
    async def workers() -> Response:
        """The live workers with their addresses and load: behind the API key, as /v1 is."""
        describe = getattr(fe.engine, "describe", None)
        data = describe() if describe is not None else []
        return Response(json_bytes({"object": "list", "data": data}), media_type="application/json")

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(fe.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
