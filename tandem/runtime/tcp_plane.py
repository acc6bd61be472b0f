"""The request plane over TCP: many concurrent streams multiplexed on one connection per peer.
This module holds the wire's shared pieces; `tcp_server` and `tcp_client` the two ends.

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

import ipaddress
import logging

import msgspec

from tandem.runtime.messages import (
    DataFrame,
    Frame,
)

log = logging.getLogger(__name__)

ENCODER = msgspec.msgpack.Encoder()
FRAME_DECODER = msgspec.msgpack.Decoder(Frame)
ANY_DECODER = msgspec.msgpack.Decoder()


class FrameTooLargeOut(Exception):
    pass


def data_frame_prefix(stream_id: int) -> bytes:
    """The msgpack bytes of `DataFrame(stream_id, ...)` up to its payload: a 3-element array,
    the tag, the stream id. Lets the server encode each item once, straight into its frame."""
    return ENCODER.encode(DataFrame(stream_id, msgspec.Raw(b"\xc0")))[:-1]


def peek_stream_id(head: bytes) -> int | None:
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


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"request plane address {address!r} is not host:port")
    return host.strip("[]"), int(port)
