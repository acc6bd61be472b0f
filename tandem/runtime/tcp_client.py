"""The request plane's TCP client: one connection per peer, streams multiplexed on it,
bounded by the credit it grants (the wire and its rules: `tcp_plane`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec

from tandem.runtime.errors import EndpointNotFound, FrameTooLarge, PeerGone, RemoteError
from tandem.runtime.framing import (
    DEFAULT_MAX_FRAME,
    PREFACE,
    FrameProtocol,
    cluster_secret,
    cluster_token,
    encode_frame,
    tls_context,
)
from tandem.runtime.messages import (
    CancelFrame,
    CreditFrame,
    DataFrame,
    EndFrame,
    ErrorFrame,
    RequestFrame,
)
from tandem.runtime.request_plane import (
    DEFAULT_WINDOW,
    END,
    ItemQueue,
    RequestClient,
    ResponseStream,
    resolve_deadline,
)
from tandem.runtime.tcp_plane import (
    ANY_DECODER,
    ENCODER,
    FRAME_DECODER,
    parse_address,
)

log = logging.getLogger(__name__)


class _ClientConnection(FrameProtocol):
    def __init__(self, client: TcpRequestClient, address: str) -> None:
        super().__init__(client.max_frame)
        self.client = client
        self.address = address
        self.streams: dict[int, _Call] = {}
        self._next_id = 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.send(PREFACE + self.client.token)

    def new_stream_id(self) -> int:
        sid = self._next_id
        self._next_id = sid % 0xFFFFFFFF + 1  # the header's u32, wrapping past 0
        return sid

    def frame_received(self, stream_id: int, frame: bytes | bytearray) -> None:
        try:
            msg = FRAME_DECODER.decode(frame)
        except msgspec.DecodeError as exc:
            log.error("request plane: malformed frame from %s dropped: %s", self.address, exc)
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # late frames of a stream we already cancelled
        if isinstance(msg, DataFrame):
            stream.queue.push(msg.payload)
        elif isinstance(msg, EndFrame):
            stream.queue.push(END)
        elif isinstance(msg, ErrorFrame):
            stream.queue.push(_remote_exception(msg))
        else:
            log.error("request plane: unexpected %s from %s", type(msg).__name__, self.address)

    def frame_rejected(self, reason: str, stream_id: int) -> None:
        log.error("request plane: rejected a frame from %s: %s", self.address, reason)
        call = self.streams.get(stream_id)
        if call is not None:
            call.queue.push(RemoteError(f"response rejected: {reason}", code="frame_too_large"))
            call.cancel()

    def connection_closed(self, exc: Exception | None) -> None:
        self.client._forget(self)
        reason = f"connection to {self.address} lost" + (f": {exc}" if exc else "")
        for stream in list(self.streams.values()):
            stream.queue.push(PeerGone(reason))
        self.streams.clear()


def _remote_exception(msg: ErrorFrame) -> BaseException:
    if msg.code == "deadline":
        return TimeoutError(f"remote deadline exceeded: {msg.message}")
    if msg.code == "no_endpoint":
        return EndpointNotFound(msg.message)
    return RemoteError(msg.message, code=msg.code)


class _Call:
    """The connection-side state of one call. Kept apart from `TcpResponseStream` so that the
    connection and the deadline timer do not keep the caller's stream object alive: dropping
    the stream must be enough to cancel the call."""

    __slots__ = ("conn", "endpoint", "finished", "queue", "sid", "timer")

    def __init__(self, conn: _ClientConnection, sid: int, endpoint: str) -> None:
        self.conn = conn
        self.sid = sid
        self.endpoint = endpoint
        self.queue = ItemQueue()
        self.finished = False
        self.timer: asyncio.TimerHandle | None = None

    def expire(self) -> None:
        self.timer = None
        if not self.finished:
            self.queue.push(TimeoutError(f"deadline exceeded calling {self.endpoint!r}"))
            self.cancel()

    def cancel(self) -> None:
        if not self.finished:
            self.conn.send(encode_frame(ENCODER, self.sid, CancelFrame()))
        self.finish()

    def finish(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.finished:
            self.finished = True
            if self.conn.streams.get(self.sid) is self:
                del self.conn.streams[self.sid]


class TcpResponseStream(ResponseStream):
    """One call's responses over a pooled connection (see the module docstring)."""

    def __init__(
        self,
        client: TcpRequestClient,
        address: str,
        endpoint: str,
        payload: Any,
        response_type: Any,
        deadline: float | None,
        window: int,
    ) -> None:
        self._client = client
        self._address = address
        self._endpoint = endpoint
        self._payload = payload
        self._response_type = response_type
        self._deadline = deadline
        self._window = window
        self._credit_batch = max(1, window // 2)
        self._call: _Call | None = None
        self._consumed = 0
        self._closed = False  # cancelled or failed before the call was made

    async def _start(self) -> _Call:
        remaining = self._remaining()
        conn = await self._client._connection(self._address, remaining)
        remaining = self._remaining()
        sid = conn.new_stream_id()
        payload = msgspec.Raw(ENCODER.encode(self._payload))
        request = encode_frame(
            ENCODER, sid, RequestFrame(self._endpoint, payload, remaining, self._window)
        )
        if len(request) > self._client.max_frame:
            raise FrameTooLarge(f"request of {len(request)} bytes exceeds {self._client.max_frame}")
        self._payload = None
        call = _Call(conn, sid, self._endpoint)
        conn.streams[sid] = call
        if not conn.send(request):
            call.finish()
            raise PeerGone(f"connection to {self._address} closed")
        if remaining is not None:
            call.timer = asyncio.get_running_loop().call_later(remaining, call.expire)
        return call

    def _remaining(self) -> float | None:
        if self._deadline is None:
            return None
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"deadline passed before {self._endpoint!r} was called")
        return remaining

    async def __anext__(self) -> Any:
        call = self._call
        if call is None:
            if self._closed:
                raise StopAsyncIteration
            try:
                call = self._call = await self._start()
            except BaseException:
                self._closed = True
                raise
        queue = call.queue
        if call.finished and not queue:
            raise StopAsyncIteration
        item = await queue.pop()
        if type(item) is msgspec.Raw:
            self._consumed += 1
            if self._consumed >= self._credit_batch and not call.finished:
                call.conn.send(encode_frame(ENCODER, call.sid, CreditFrame(self._consumed)))
                self._consumed = 0
            try:
                if self._response_type is None:
                    return ANY_DECODER.decode(item)
                return msgspec.msgpack.decode(item, type=self._response_type)
            except msgspec.DecodeError as exc:
                call.cancel()
                raise RemoteError(f"undecodable response: {exc}", code="bad_response") from exc
        call.finish()
        if item is END:
            raise StopAsyncIteration
        raise item

    def buffered(self) -> int:
        return len(self._call.queue) if self._call is not None else 0

    def cancel(self) -> None:
        self._closed = True
        if self._call is not None:
            self._call.cancel()
            self._call.queue.replace_all(END)

    def __del__(self) -> None:
        call = self._call
        if call is not None and not call.finished:
            with contextlib.suppress(Exception):
                call.cancel()


class TcpRequestClient(RequestClient):
    """Calls endpoints on remote `TcpRequestServer`s, one reused connection per address."""

    def __init__(
        self,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        window: int = DEFAULT_WINDOW,
        connect_timeout: float = 5.0,
        secret: str | None = None,
    ) -> None:
        """`secret`: the cluster secret to present (default: `$TANDEM_CLUSTER_SECRET`)."""
        self.token = cluster_token(secret or cluster_secret())
        self.ssl = tls_context(server=False)
        self.max_frame = max_frame
        self.window = max(1, window)
        self.connect_timeout = connect_timeout
        self._conns: dict[str, _ClientConnection] = {}
        self._connecting: dict[str, asyncio.Future[_ClientConnection]] = {}

    def call(
        self,
        address: str,
        endpoint: str,
        payload: Any,
        *,
        response_type: Any = None,
        timeout: float | None = None,
        deadline: float | None = None,
        window: int | None = None,
    ) -> TcpResponseStream:
        return TcpResponseStream(
            self,
            address,
            endpoint,
            payload,
            response_type,
            resolve_deadline(timeout, deadline),
            max(1, window or self.window),
        )

    async def _connection(self, address: str, remaining: float | None) -> _ClientConnection:
        conn = self._conns.get(address)
        if conn is not None and not conn.closed:
            return conn
        pending = self._connecting.get(address)
        if pending is None:
            pending = asyncio.ensure_future(self._connect(address))
            self._connecting[address] = pending
            pending.add_done_callback(lambda _: self._connecting.pop(address, None))
        wait = self.connect_timeout if remaining is None else min(remaining, self.connect_timeout)
        try:
            return await asyncio.wait_for(asyncio.shield(pending), wait)
        except TimeoutError:
            if remaining is not None and remaining <= self.connect_timeout:
                raise TimeoutError(f"deadline passed while connecting to {address}") from None
            raise PeerGone(f"cannot connect to {address}: timed out") from None

    async def _connect(self, address: str) -> _ClientConnection:
        host, port = parse_address(address)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _ClientConnection(self, address),
                    host,
                    port,
                    ssl=self.ssl,
                    server_hostname=host if self.ssl else None,
                ),
                self.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise PeerGone(f"cannot connect to {address}: {exc}") from exc
        self._conns[address] = conn
        return conn

    def _forget(self, conn: _ClientConnection) -> None:
        if self._conns.get(conn.address) is conn:
            del self._conns[conn.address]

    async def close(self) -> None:
        for conn in list(self._conns.values()):
            conn.close()
        self._conns.clear()
