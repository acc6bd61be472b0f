"""`tandem router`: the router as its own process, for debugging and for tools.

It follows the same discovery, load and KV events as a frontend's embedded router, and
answers over HTTP (JSON) which worker it would choose for a prompt and why:

* `POST /best_worker` `{"token_ids": [...], "lora_name": null}` -> the decision;
* `POST /overlap_scores` (same body) -> every worker's overlap, load and cost;
* `GET /health` (the workers), `GET /metrics` (the router's Prometheus metrics).

Queries book nothing: the process never learns when a request ends.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import msgspec
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tandem.http.errors import APIError, install_handlers
from tandem.http.server import ReadyServer
from tandem.protocol.worker import DEFAULT_NAMESPACE
from tandem.router.metrics import RouterCollector
from tandem.router.pool import WorkerPool
from tandem.router.router import Policy

log = logging.getLogger(__name__)

#: Seconds each part of the router may take to close at shutdown before it is left behind.
CLOSE_TIMEOUT_S = 5.0


class Query(msgspec.Struct, forbid_unknown_fields=True):
    token_ids: list[int]
    lora_name: str | None = None


def _json(data: Any) -> Response:
    return Response(msgspec.json.encode(data), media_type="application/json")


def build_router_app(pool: WorkerPool) -> FastAPI:
    app = FastAPI(title="Tandem router", docs_url=None, redoc_url=None)
    install_handlers(app)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(RouterCollector(pool))

    async def parse(request: Request) -> Query:
        try:
            query = msgspec.json.decode(await request.body(), type=Query)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise APIError(400, f"invalid query: {exc}", code="invalid_request") from None
        if not query.token_ids:
            raise APIError(400, "token_ids must not be empty", param="token_ids")
        if pool.router is None or not pool.workers:
            raise APIError(503, "no live workers")
        return query

    @app.post("/best_worker")
    async def best_worker(request: Request) -> Response:
        query = await parse(request)
        assert pool.router is not None
        decision = pool.router.select(
            query.token_ids, list(pool.workers), lora_name=query.lora_name
        )
        address = pool.workers[decision.worker_id].info.address
        return _json({**msgspec.to_builtins(decision), "address": address})

    @app.post("/overlap_scores")
    async def overlap_scores(request: Request) -> Response:
        query = await parse(request)
        assert pool.router is not None
        scores = pool.router.scores(query.token_ids, list(pool.workers), query.lora_name)
        return _json({"block_size": pool.router.block_size, "scores": scores})

    @app.get("/health")
    async def health() -> Response:
        if pool.error is not None:
            raise APIError(503, f"not serving: {pool.error}")
        return _json({"status": "ok", "workers": pool.describe()})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def serve_router(
    nats_url: str,
    sock: socket.socket,
    *,
    url: str,
    namespace: str = DEFAULT_NAMESPACE,
    policy: Policy = "kv",
    router_options: dict[str, Any] | None = None,
    log_level: str = "info",
) -> None:
    """Follow the namespace's workers and answer queries on `sock` until a signal stops it."""
    from tandem.runtime import TcpRequestClient
    from tandem.runtime.nats_discovery import NatsDiscovery
    from tandem.runtime.nats_event_plane import NatsEventPlane

    discovery = await NatsDiscovery.connect(nats_url)
    events = await NatsEventPlane.connect(nats_url)
    client = TcpRequestClient()
    pool = WorkerPool(
        discovery,
        events,
        client,
        namespace=namespace,
        policy=policy,
        router_options=router_options,
    )
    try:
        await pool.start()
        server = ReadyServer(
            uvicorn.Config(build_router_app(pool), log_level=log_level),
            ready_line=f"router ({policy}) for namespace {namespace!r} answering at {url}",
            on_shutdown=pool.close,
        )
        await server.serve(sockets=[sock])
    finally:
        parts = {"worker pool": pool, "request client": client, "discovery": discovery,
                 "event plane": events}  # fmt: skip
        for name, part in parts.items():
            try:
                await asyncio.wait_for(part.close(), CLOSE_TIMEOUT_S)
            except TimeoutError:  # a stopping router exits; the log says what hung
                log.warning("shutdown: the %s did not close in %.0f s; left behind", name,
                            CLOSE_TIMEOUT_S)  # fmt: skip
