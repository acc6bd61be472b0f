"""The request plane's TCP server: one connection per client, each stream pumped by
credit (the wire and its rules: `tcp_plane`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec

from tandem.runtime.framing import (
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    FrameProtocol,
    cluster_secret,
    cluster_token,
    encode_frame,
    frame_header,
    tls_context,
)
from tandem.runtime.messages import (
    CancelFrame,
    CreditFrame,
    EndFrame,
    ErrorFrame,
    RequestFrame,
)
from tandem.runtime.request_plane import (
    DeadlineExceeded,
    Endpoint,
    RequestServer,
    describe,
    drive_handler,
)
from tandem.runtime.tcp_plane import (
    ANY_DECODER,
    DATA_FRAME_PREFIX,
    ENCODER,
    FRAME_DECODER,
    FrameTooLargeOut,
    is_loopback,
)

log = logging.getLogger(__name__)


class _ServerStream:
    __slots__ = ("credit", "credit_event", "shutdown", "task")

    def __init__(self, credit: int) -> None:
        self.credit = credit
        self.credit_event: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None
        self.shutdown = False


class _ServerConnection(FrameProtocol):
    def __init__(self, server: TcpRequestServer) -> None:
        super().__init__(server.max_frame, expect_preface=True, token=server.token)
        self.server = server
        self.streams: dict[int, _ServerStream] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server._connections.add(self)

    def connection_closed(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        for stream in list(self.streams.values()):
            if stream.task is not None:
                stream.task.cancel()

    def frame_received(self, stream_id: int, frame: bytes | bytearray) -> None:
        try:
            msg = FRAME_DECODER.decode(frame)
        except msgspec.DecodeError as exc:
            log.error("request plane: malformed frame from %s dropped: %s", self.peer, exc)
            return
        if isinstance(msg, CreditFrame):
            stream = self.streams.get(stream_id)
            if stream is not None and msg.n > 0:
                stream.credit += msg.n
                if stream.credit_event is not None:
                    stream.credit_event.set()
        elif isinstance(msg, RequestFrame):
            self._open(stream_id, msg)
        elif isinstance(msg, CancelFrame):
            stream = self.streams.get(stream_id)
            if stream is not None and stream.task is not None:
                stream.task.cancel()
        else:
            log.error("request plane: unexpected %s from %s", type(msg).__name__, self.peer)

    def frame_rejected(self, reason: str, stream_id: int) -> None:
        super().frame_rejected(reason, stream_id)
        if stream_id not in self.streams:
            self._error(stream_id, "frame_too_large", f"request rejected: {reason}")

    def _error(self, stream_id: int, code: str, message: str) -> None:
        self.send(encode_frame(ENCODER, stream_id, ErrorFrame(code, message)))

    def _open(self, sid: int, msg: RequestFrame) -> None:
        if sid in self.streams:
            log.error("request plane: %s reused open stream id %d", self.peer, sid)
            return
        if self.server._stopping:
            self._error(sid, "shutdown", "server is shutting down")
            return
        if len(self.streams) >= self.server.max_streams_per_connection:
            self._error(sid, "overloaded", "too many concurrent streams on this connection")
            return
        endpoint = self.server.endpoints.get(msg.endpoint)
        if endpoint is None:
            self._error(sid, "no_endpoint", f"no endpoint {msg.endpoint!r} at this address")
            return
        try:
            if endpoint.request_type is None:
                request = ANY_DECODER.decode(msg.payload)
            else:
                request = msgspec.msgpack.decode(msg.payload, type=endpoint.request_type)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            log.error("request plane: bad request for %r from %s: %s", msg.endpoint, self.peer, exc)
            self._error(sid, "bad_request", str(exc))
            return
        stream = _ServerStream(max(1, msg.window))
        self.streams[sid] = stream
        stream.task = asyncio.get_running_loop().create_task(
            self._run(sid, msg.endpoint, stream, endpoint, request, msg.timeout)
        )

    async def _run(
        self,
        sid: int,
        name: str,
        stream: _ServerStream,
        endpoint: Endpoint,
        request: Any,
        timeout: float | None,
    ) -> None:
        max_frame = self.max_frame
        offset = HEADER_SIZE + len(DATA_FRAME_PREFIX)

        async def emit(item: Any) -> None:
            while stream.credit <= 0:
                if stream.credit_event is None:
                    stream.credit_event = asyncio.Event()
                stream.credit_event.clear()
                await stream.credit_event.wait()
            # DataFrame(item) encoded in one pass: the fixed prefix, then the item.
            frame = bytearray(offset)
            ENCODER.encode_into(item, frame, offset)
            frame[:HEADER_SIZE] = frame_header(len(frame) - HEADER_SIZE, sid)
            frame[HEADER_SIZE:offset] = DATA_FRAME_PREFIX
            if len(frame) > max_frame:
                raise FrameTooLargeOut(f"response item of {len(frame)} bytes exceeds {max_frame}")
            stream.credit -= 1
            self.send(frame)
            await self.drain()

        try:
            await drive_handler(endpoint.handler(request), emit, timeout)
        except DeadlineExceeded as exc:
            self._error(sid, "deadline", str(exc))
        except asyncio.CancelledError:
            if stream.shutdown:
                self._error(sid, "shutdown", "server shut down before the handler finished")
            # else: the client cancelled or the connection is gone; nobody to tell.
        except FrameTooLargeOut as exc:
            log.error("request plane: %s", exc)
            self._error(sid, "frame_too_large", str(exc))
        except ConnectionError:
            pass  # connection lost while sending
        except Exception as exc:
            log.warning("handler %r failed: %s", name, describe(exc), exc_info=True)
            self._error(sid, "handler_error", describe(exc))
        else:
            self.send(encode_frame(ENCODER, sid, EndFrame()))
        finally:
            if self.streams.get(sid) is stream:
                del self.streams[sid]


class TcpRequestServer(RequestServer):
    """Serves endpoints over TCP. Binds 127.0.0.1 by default; `advertise_host` is the host
    written into `address` when binding a wildcard address (0.0.0.0).

    With a cluster `secret` (default: `$TANDEM_CLUSTER_SECRET`) only clients that present it
    are served; with `$TANDEM_TLS_CERT` (and `_KEY`, `_CA`) connections are mutual TLS.
    Without a secret, binding beyond the loopback interface is refused unless `insecure`:
    anyone who can reach the port could run requests and read KV blocks."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        advertise_host: str | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_streams_per_connection: int = 4096,
        secret: str | None = None,
        insecure: bool = False,
    ) -> None:
        super().__init__()
        secret = secret or cluster_secret()
        if secret is None and not insecure and not is_loopback(host):
            raise ValueError(
                f"the request plane would listen on {host} without a cluster secret: set"
                " --cluster-secret (or TANDEM_CLUSTER_SECRET) on every component, or pass"
                " --insecure to accept any peer that can reach it"
            )
        self.token = cluster_token(secret) if secret else None
        self.ssl = tls_context(server=True)
        self.host = host
        self.port = port
        self.advertise_host = advertise_host or host
        self.max_frame = max_frame
        self.max_streams_per_connection = max_streams_per_connection
        self._server: asyncio.Server | None = None
        self._connections: set[_ServerConnection] = set()
        self._stopping = False

    @property
    def address(self) -> str:
        host = f"[{self.advertise_host}]" if ":" in self.advertise_host else self.advertise_host
        return f"{host}:{self.port}"

    @property
    def inflight(self) -> int:
        return sum(len(c.streams) for c in self._connections)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ServerConnection(self),
            self.host,
            self.port,
            reuse_address=True,
            ssl=self.ssl,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("request plane listening on %s", self.address)

    async def stop(self, grace: float = 0.0) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
        tasks = [s.task for c in self._connections for s in c.streams.values() if s.task]
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for conn in list(self._connections):
            for stream in conn.streams.values():
                if stream.task is not None and not stream.task.done():
                    stream.shutdown = True
                    stream.task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        for conn in list(self._connections):
            conn.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
