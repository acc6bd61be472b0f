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

from tandem.frontend.remote_engine import RemoteEngine
from tandem.protocol.worker import DEFAULT_NAMESPACE
from tandem.router import Policy

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server plus a ready line, and the pool's shutdown inside uvicorn's graceful
    exit (after a signal uvicorn re-raises it, ending the process before our `finally`)."""

    def __init__(self, config: uvicorn.Config, ready_line: str, remote: RemoteEngine) -> None:
        super().__init__(config)
        self.ready_line = ready_line
        self.remote = remote

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            log.info("%s", self.ready_line)

    async def shutdown(self, sockets: Any = None) -> None:
        await super().shutdown(sockets)
        await self.remote.close()


async def serve_frontend(
    nats_url: str,
    sock: socket.socket,
    *,
    url: str,
    served_model_name: str | None = None,
    tokenizer: str | None = None,
    api_key: str | None = None,
    max_waiting: int = 256,
    namespace: str = DEFAULT_NAMESPACE,
    min_workers: int = 1,
    log_level: str = "info",
    policy: Policy = "kv",
    router_options: dict[str, Any] | None = None,
) -> None:
    """Wait for `min_workers` workers, then serve HTTP on `sock` until a signal stops it."""
    from tandem.frontend.server import build_app
    from tandem.runtime import TcpRequestClient
    from tandem.runtime.nats_discovery import NatsDiscovery
    from tandem.runtime.nats_event_plane import NatsEventPlane

    discovery = await NatsDiscovery.connect(nats_url)
    events = await NatsEventPlane.connect(nats_url)
    client = TcpRequestClient()
    remote = RemoteEngine(
        discovery, events, client, namespace=namespace, policy=policy, router_options=router_options
    )
    try:
        await remote.start()
        log.info("waiting for %d worker(s) of namespace %r on %s", min_workers, namespace, nats_url)
        await remote.wait_for_workers(min_workers)
        card = remote.card
        assert card is not None
        served = served_model_name or card.model
        app = build_app(
            remote, tokenizer or card.tokenizer, served, api_key=api_key, max_waiting=max_waiting
        )
        server = _Server(
            uvicorn.Config(app, log_level=log_level),
            ready_line=f"serving {served!r} at {url}/v1 (OpenAI API) with "
            f"{len(remote.describe())} worker(s), router {policy}; Ctrl-C stops",
            remote=remote,
        )
        await server.serve(sockets=[sock])
    finally:
        await remote.close()
        await client.close()
        await discovery.close()
        await events.close()
