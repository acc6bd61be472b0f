"""The `tandem frontend` process: the OpenAI HTTP server in front of workers found over NATS.

Everything (NATS connections, discovery watch, the HTTP server) runs on one event loop, since
the `RemoteEngine`'s streams and subscriptions belong to the loop that made them. The app is
built only once `min_workers` workers are live, because the first model card supplies the
tokenizer location (unless `tokenizer` is given), the served name and `max_model_len`.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import uvicorn

from tandem.frontend.disagg import DisaggConfig
from tandem.frontend.remote_engine import MIGRATION_LIMIT, RemoteEngine
from tandem.http.server import ReadyServer
from tandem.protocol.worker import DEFAULT_NAMESPACE
from tandem.router import Policy

log = logging.getLogger(__name__)


async def serve_frontend(
    nats_url: str,
    sock: socket.socket,
    *,
    url: str,
    served_model_name: str | None = None,
    tokenizer: str | None = None,
    api_key: str | None = None,
    max_waiting: int = 256,
    max_request_bytes: int = 8 * 2**20,  # the CLI passes --max-request-bytes
    max_client_rate: float = 0.0,
    namespace: str = DEFAULT_NAMESPACE,
    min_workers: int = 1,
    min_prefill_workers: int = 0,
    log_level: str = "info",
    policy: Policy = "kv",
    router_options: dict[str, Any] | None = None,
    disagg: DisaggConfig | None = None,
    migration_limit: int = MIGRATION_LIMIT,
) -> None:
    """Wait for `min_workers` decode (or aggregated) workers and `min_prefill_workers` prefill
    workers, then serve HTTP on `sock` until a signal stops it."""
    from tandem.frontend.server import build_app
    from tandem.runtime import TcpRequestClient
    from tandem.runtime.nats_discovery import NatsDiscovery
    from tandem.runtime.nats_event_plane import NatsEventPlane

    discovery = await NatsDiscovery.connect(nats_url)
    events = await NatsEventPlane.connect(nats_url)
    client = TcpRequestClient()
    remote = RemoteEngine(
        discovery,
        events,
        client,
        namespace=namespace,
        policy=policy,
        router_options=router_options,
        disagg=disagg,
        migration_limit=migration_limit,
    )
    try:
        await remote.start()
        log.info(
            "waiting for %d worker(s) and %d prefill worker(s) of namespace %r on %s",
            min_workers,
            min_prefill_workers,
            namespace,
            nats_url,
        )
        await remote.wait_for_workers(min_workers, prefill=min_prefill_workers)
        card = remote.card
        assert card is not None
        served = served_model_name or card.model
        app = build_app(
            remote,
            tokenizer or card.tokenizer,
            served,
            api_key=api_key,
            max_waiting=max_waiting,
            max_request_bytes=max_request_bytes,
            max_client_rate=max_client_rate,
        )
        server = ReadyServer(
            uvicorn.Config(app, log_level=log_level),
            ready_line=f"serving {served!r} at {url}/v1 (OpenAI API) with "
            f"{_workers(remote)}, router {policy}; Ctrl-C stops",
            on_shutdown=remote.close,
        )
        await server.serve(sockets=[sock])
    finally:
        await remote.close()
        await client.close()
        await discovery.close()
        await events.close()


def _workers(remote: RemoteEngine) -> str:
    text = f"{len(remote.pool.workers)} worker(s)"
    if remote.prefill.workers:
        text += f" and {len(remote.prefill.workers)} prefill worker(s)"
    return text
