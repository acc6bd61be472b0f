"""Length-prefixed frames over a byte stream, as an asyncio Protocol.

A frame is an 8-byte header, the body's length and the id of the stream it belongs to (both
big-endian u32), followed by that many bytes of msgpack. A connection opens
with an 8-byte preface from the client (`PREFACE`), so something that is not a Tandem peer
(a port scanner, an HTTP client) is turned away at once instead of being read as a frame length,
then a 32-byte cluster token (`cluster_token`): a server given a cluster secret closes a
connection whose token does not match it (a constant-time compare).

Frames longer than `max_frame` are not buffered: their bytes are skipped as they arrive and the
frame is reported to `frame_rejected` with its stream id (so the receiver fails just that
stream), and the connection stays in sync and keeps serving. This is a BufferedProtocol
(callbacks on received data) rather than StreamReader coroutines because many small frames (one
per streamed token) arrive per read, and parsing them in one synchronous loop costs far less than
two awaits per frame; buffered, so that the megabytes of a KV transfer are received straight into
the buffer that is handed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import socket
import ssl
from typing import Any

log = logging.getLogger(__name__)


TLS_ENV = ("TANDEM_TLS_CERT", "TANDEM_TLS_KEY", "TANDEM_TLS_CA")


def tls_context(server: bool) -> ssl.SSLContext | None:
    """Mutual TLS for the request plane from `$TANDEM_TLS_CERT`, `_KEY` and `_CA` (None when
    no certificate is set): each side shows its certificate and checks the other's against
    the CA; clients also check that the server's certificate names the host they dialled."""
    cert, key, ca = (os.environ.get(name) for name in TLS_ENV)
    if not cert:
        return None
    if not (key and ca):
        raise ValueError("TLS needs TANDEM_TLS_CERT, TANDEM_TLS_KEY and TANDEM_TLS_CA together")
    purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
    context = ssl.create_default_context(purpose, cafile=ca)
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def cluster_secret() -> str | None:
    """The cluster secret of this process's environment; None (or empty): none."""
    return os.environ.get(SECRET_ENV) or None


def cluster_token(secret: str | None) -> bytes:
    """What a client sends after the preface: a digest of the secret (zeros without one), so
    the secret itself never crosses the wire."""
    if not secret:
        return bytes(TOKEN_SIZE)
    return hashlib.sha256(b"tandem cluster secret\0" + secret.encode()).digest()

PREFACE = b"TANDEM\x00\x03"
TOKEN_SIZE = 32
#: Where components read the cluster secret (`--cluster-secret` sets it for their children).
SECRET_ENV = "TANDEM_CLUSTER_SECRET"
HEADER_SIZE = 8  # body length, stream id
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
FLUSH_BYTES = 256 * 1024
RECV_BYTES = 256 * 1024
LARGE_FRAME = RECV_BYTES // 4  # smaller frames always fit the receive buffer beside a tail


def encode_frame(encoder: Any, stream_id: int, message: Any) -> bytearray:
    """`message` msgpack-encoded behind its header, in one buffer."""
    buf = bytearray(HEADER_SIZE)
    encoder.encode_into(message, buf, HEADER_SIZE)
    buf[:HEADER_SIZE] = frame_header(len(buf) - HEADER_SIZE, stream_id)
    return buf


def frame_header(size: int, stream_id: int) -> bytes:
    return size.to_bytes(4, "big") + stream_id.to_bytes(4, "big")


def set_keepalive(
    sock: socket.socket | None, idle: int = 5, interval: int = 2, count: int = 3
) -> None:
    """Enable TCP keepalive so a peer whose host vanished (no FIN, no RST) is detected in
    about `idle + interval * count` seconds instead of hours. A killed process is detected
    at once anyway: its kernel closes the socket."""
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


class FrameProtocol(asyncio.BufferedProtocol):
    """Splits the byte stream into frames and handles write flow control.

    Subclasses implement `frame_received` (and may override `frame_rejected`,
    `preface_received`, `connection_closed`). `send` queues bytes; `drain` waits while the
    transport's write buffer is above its high-water mark (TCP backpressure).

    Bytes are received into a buffer this protocol owns (`get_buffer`): small frames are parsed
    out of a fixed receive buffer, and a frame of `LARGE_FRAME` bytes or more (a KV chunk) gets
    a buffer of its own that the socket fills directly, handed on without another copy.
    """

    def __init__(
        self,
        max_frame: int = DEFAULT_MAX_FRAME,
        expect_preface: bool = False,
        token: bytes | None = None,
    ) -> None:
        """`expect_preface`: the peer must open with the preface and a cluster token, equal
        to `token` when given (None: any token)."""
        self.max_frame = max_frame
        self._token = token
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._rbuf = bytearray(RECV_BYTES)
        self._rview = memoryview(self._rbuf)
        self._start = 0  # received bytes not yet parsed: self._rbuf[self._start : self._end]
        self._end = 0
        self._large: bytearray | None = None  # a large frame being received into its own buffer
        self._large_stream = 0
        self._filled = 0  # bytes of it received so far
        self._skip = 0  # bytes of an oversized frame still to discard
        self._need_preface = expect_preface
        self._paused = False
        self._wbuf: list[bytes | bytearray] = []
        self._wsize = 0
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closed = False
        self.close_exc: BaseException | None = None

    # ---- asyncio.BufferedProtocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport
        self._loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        set_keepalive(transport.get_extra_info("socket"))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._large is not None:
            return memoryview(self._large)[self._filled :]
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == RECV_BYTES:  # move the unparsed tail (less than one frame) to the front
            n = self._end - self._start
            self._rbuf[:n] = self._rbuf[self._start : self._end]
            self._start, self._end = 0, n
        return self._rview[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._large is not None:
            self._filled += nbytes
            if self._filled == len(self._large):
                frame, self._large = self._large, None
                self.frame_received(self._large_stream, frame)
            return
        self._end += nbytes
        if self._need_preface:
            opening, have = len(PREFACE) + TOKEN_SIZE, self._end - self._start
            got = bytes(self._rbuf[self._start : self._start + min(have, opening)])
            refused = None
            if got[: len(PREFACE)] != PREFACE[: len(got)]:  # turned away on its first bytes
                refused = "sent no Tandem preface (or one of another version)"
            elif have < opening:
                return
            elif self._token is not None and not hmac.compare_digest(
                got[len(PREFACE) :], self._token
            ):
                refused = "did not present this cluster's secret"
            if refused is not None:
                log.error("request plane: %s %s; closing", self.peer, refused)
                self._start = self._end
                self.close()
                return
            self._need_preface = False
            self._start += opening
            self.preface_received()
        self._parse()

    def _parse(self) -> None:
        """Hand on every whole frame in the receive buffer; start receiving a large one."""
        buf, view = self._rbuf, self._rview
        pos, end = self._start, self._end
        while not self._closed:
            if self._skip:
                n = min(self._skip, end - pos)
                self._skip -= n
                pos += n
                if self._skip:
                    break
            if end - pos < HEADER_SIZE:
                break
            size = int.from_bytes(buf[pos : pos + 4], "big")
            stream_id = int.from_bytes(buf[pos + 4 : pos + HEADER_SIZE], "big")
            if size > self.max_frame:
                pos += HEADER_SIZE
                self._skip = size
                reason = f"frame of {size} bytes exceeds the limit of {self.max_frame}"
                self.frame_rejected(reason, stream_id)
                continue
            start = pos + HEADER_SIZE
            have = end - start
            if have < size:
                if size >= LARGE_FRAME:
                    self._large = bytearray(size)
                    self._large[:have] = view[start:end]
                    self._large_stream, self._filled = stream_id, have
                    pos = end
                break
            pos = start + size
            self.frame_received(stream_id, bytes(view[start:pos]))
        self._start = pos

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drainers(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.close_exc = exc
        self._wake_drainers(exc or ConnectionResetError("connection closed"))
        self.connection_closed(exc)

    # ---- for subclasses ----------------------------------------------------------------------

    def frame_received(self, stream_id: int, frame: bytes | bytearray) -> None:
        """One whole frame; a large one arrives as the bytearray it was received into."""
        raise NotImplementedError

    def frame_rejected(self, reason: str, stream_id: int) -> None:
        """An oversized frame of `stream_id` is being skipped: fail that stream rather than
        leave it waiting."""
        log.error("request plane: rejected a frame from %s: %s", self.peer, reason)

    def preface_received(self) -> None:
        pass

    def connection_closed(self, exc: Exception | None) -> None:
        pass

    # ---- writing -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, data: bytes | bytearray) -> bool:
        """Queue `data` for sending; False if the connection is already closed.

        Frames queued in the same event-loop iteration (many streams' tokens, or a burst of one
        stream's) go out in one write at the end of it: one syscall instead of one per frame."""
        if self._closed or self.transport is None or self.transport.is_closing():
            return False
        if not self._wbuf:
            self._loop.call_soon(self._flush)
        self._wbuf.append(data)
        self._wsize += len(data)
        if self._wsize >= FLUSH_BYTES:
            self._flush()
        return True

    def _flush(self) -> None:
        if not self._wbuf:
            return
        data = self._wbuf[0] if len(self._wbuf) == 1 else b"".join(self._wbuf)
        self._wbuf = []
        self._wsize = 0
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the write buffer is below its high-water mark.
        Raises ConnectionResetError if the connection closes meanwhile."""
        if self._closed:
            raise ConnectionResetError("connection closed")
        if self._wsize >= FLUSH_BYTES // 2:
            self._flush()
        if not self._paused:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def close(self) -> None:
        self._flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _wake_drainers(self, exc: BaseException | None) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)
