"""The request plane over TCP: many concurrent streams multiplexed on one connection per peer.

Wire: the client sends `framing.PREFACE` and its cluster token, then both sides exchange
length-prefixed msgpack frames (`messages.Frame`). Client stream ids are per connection. A call is

    client → RequestFrame(id, endpoint, payload, timeout, window)
    server → DataFrame(id, item) ...  then EndFrame(id) or ErrorFrame(id, code, message)
    client → CreditFrame(id, n) as it consumes;  CancelFrame(id) if it stops early

**Backpressure** is credit-based per stream, so one slow consumer never stalls the other streams
on its connection and never makes either side buffer without bound:

* The client grants `window` items in the request. The server's pump for that stream sends an
  item only while it holds credit, and otherwise waits *before pulling the next item from the
  handler*: the handler itself is suspended at its `yield`, so the engine's output for a stalled
  consumer stays where it is produced.
* The client buffers at most `window` items per stream (it never receives more than it
  granted), and grants credit back in batches of `window // 2` as its consumer takes items.
* Across the connection, the server awaits the transport's drain (TCP flow control); the client
  reads the socket eagerly because its per-stream buffers are bounded by credit, so one stream's
  slow consumer cannot block the socket for the others (no head-of-line blocking).

**Failure handling**: a connection that closes or resets (the peer process died: its kernel
closes the socket; TCP keepalive covers a vanished host) fails every open stream on it with
`PeerGone` at once, and the next call opens a new connection. On the server, a lost connection
cancels its handlers. Malformed frames are logged and dropped; oversized frames are skipped
(`framing`) and logged; the connection and the server keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from typing import Any

import msgspec

from tandem.runtime.errors import EndpointNotFound, FrameTooLarge, PeerGone, RemoteError
from tandem.runtime.framing import (
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
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
    Frame,
    RequestFrame,
)
from tandem.runtime.request_plane import (
    DEFAULT_WINDOW,
    END,
    DeadlineExceeded,
    Endpoint,
    ItemQueue,
    RequestClient,
    RequestServer,
    ResponseStream,
    describe,
    drive_handler,
    resolve_deadline,
)

log = logging.getLogger(__name__)

_encoder = msgspec.msgpack.Encoder()
_frame_decoder = msgspec.msgpack.Decoder(Frame)
_any_decoder = msgspec.msgpack.Decoder()


class _FrameTooLargeOut(Exception):
    pass


def _data_frame_prefix(stream_id: int) -> bytes:
    """The msgpack bytes of `DataFrame(stream_id, ...)` up to its payload: a 3-element array,
    the tag, the stream id. Lets the server encode each item once, straight into its frame."""
    return _encoder.encode(DataFrame(stream_id, msgspec.Raw(b"\xc0")))[:-1]


def _peek_stream_id(head: bytes) -> int | None:
    """The stream id of a frame from its first bytes (`[tag, stream_id, ...]` in msgpack), or
    None if they do not look like a frame."""
    if len(head) < 3:
        return None
    first = head[0]
    if 0x90 <= first <= 0x9F:
        pos = 1
    elif first == 0xDC:
        pos = 3
    elif first == 0xDD:
        pos = 5
    else:
        return None
    if pos >= len(head) or head[pos] > 0x7F:  # the tag: a small positive int
        return None
    pos += 1
    if pos >= len(head):
        return None
    marker = head[pos]
    if marker <= 0x7F:
        return marker
    sizes = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
    size = sizes.get(marker)
    if size is None or pos + 1 + size > len(head):
        return None
    return int.from_bytes(head[pos + 1 : pos + 1 + size], "big")


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"request plane address {address!r} is not host:port")
    return host.strip("[]"), int(port)


# ---- server ----------------------------------------------------------------------------------


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

    def frame_received(self, frame: bytes | bytearray) -> None:
        try:
            msg = _frame_decoder.decode(frame)
        except msgspec.DecodeError as exc:
            log.error("request plane: malformed frame from %s dropped: %s", self.peer, exc)
            return
        if isinstance(msg, CreditFrame):
            stream = self.streams.get(msg.stream_id)
            if stream is not None and msg.n > 0:
                stream.credit += msg.n
                if stream.credit_event is not None:
                    stream.credit_event.set()
        elif isinstance(msg, RequestFrame):
            self._open(msg)
        elif isinstance(msg, CancelFrame):
            stream = self.streams.get(msg.stream_id)
            if stream is not None and stream.task is not None:
                stream.task.cancel()
        else:
            log.error("request plane: unexpected %s from %s", type(msg).__name__, self.peer)

    def frame_rejected(self, reason: str, head: bytes) -> None:
        super().frame_rejected(reason, head)
        sid = _peek_stream_id(head)
        if sid is not None and sid not in self.streams:
            self._error(sid, "frame_too_large", f"request rejected: {reason}")

    def _error(self, stream_id: int, code: str, message: str) -> None:
        self.send(encode_frame(_encoder, ErrorFrame(stream_id, code, message)))

    def _open(self, msg: RequestFrame) -> None:
        sid = msg.stream_id
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
                request = _any_decoder.decode(msg.payload)
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
        prefix = _data_frame_prefix(sid)
        offset = HEADER_SIZE + len(prefix)

        async def emit(item: Any) -> None:
            while stream.credit <= 0:
                if stream.credit_event is None:
                    stream.credit_event = asyncio.Event()
                stream.credit_event.clear()
                await stream.credit_event.wait()
            # DataFrame(sid, item) encoded in one pass: the fixed prefix, then the item.
            frame = bytearray(offset)
            _encoder.encode_into(item, frame, offset)
            frame[:HEADER_SIZE] = (len(frame) - HEADER_SIZE).to_bytes(HEADER_SIZE, "big")
            frame[HEADER_SIZE:offset] = prefix
            if len(frame) > max_frame:
                raise _FrameTooLargeOut(f"response item of {len(frame)} bytes exceeds {max_frame}")
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
        except _FrameTooLargeOut as exc:
            log.error("request plane: %s", exc)
            self._error(sid, "frame_too_large", str(exc))
        except ConnectionError:
            pass  # connection lost while sending
        except Exception as exc:
            log.warning("handler %r failed: %s", name, describe(exc), exc_info=True)
            self._error(sid, "handler_error", describe(exc))
        else:
            self.send(encode_frame(_encoder, EndFrame(sid)))
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
            lambda: _ServerConnection(self), self.host, self.port, reuse_address=True,
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


# ---- client ----------------------------------------------------------------------------------


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
        self._next_id += 1
        return sid

    def frame_received(self, frame: bytes | bytearray) -> None:
        try:
            msg = _frame_decoder.decode(frame)
        except msgspec.DecodeError as exc:
            log.error("request plane: malformed frame from %s dropped: %s", self.address, exc)
            return
        stream = self.streams.get(msg.stream_id)
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

    def frame_rejected(self, reason: str, head: bytes) -> None:
        log.error("request plane: rejected a frame from %s: %s", self.address, reason)
        call = self.streams.get(_peek_stream_id(head) or 0)
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
            self.conn.send(encode_frame(_encoder, CancelFrame(self.sid)))
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
        payload = msgspec.Raw(_encoder.encode(self._payload))
        request = encode_frame(
            _encoder, RequestFrame(sid, self._endpoint, payload, remaining, self._window)
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
                call.conn.send(encode_frame(_encoder, CreditFrame(call.sid, self._consumed)))
                self._consumed = 0
            try:
                if self._response_type is None:
                    return _any_decoder.decode(item)
                return msgspec.msgpack.decode(item, type=self._response_type)
            except msgspec.DecodeError as exc:
                call.cancel()
                raise RemoteError(f"undecodable response: {exc}", code="bad_response") from exc
        call.finish()
        if item is END:
            raise StopAsyncIteration
        raise item

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
        host, port = _parse_address(address)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _ClientConnection(self, address), host, port, ssl=self.ssl,
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
