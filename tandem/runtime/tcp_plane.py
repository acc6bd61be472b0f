"""The request plane over TCP: many concurrent streams multiplexed on one connection per peer.
This module holds the wire's shared pieces; `tcp_server` and `tcp_client` the two ends.

Wire: the client sends `framing.PREFACE` and its cluster token, then both sides exchange
frames whose header carries the stream id and whose body is a msgpack `messages.Frame`.
Client stream ids are per connection. A call on stream `id` is

    client → [id] RequestFrame(endpoint, payload, timeout, window)
    server → [id] DataFrame(item) ...  then [id] EndFrame() or [id] ErrorFrame(code, message)
    client → [id] CreditFrame(n) as it consumes;  [id] CancelFrame() if it stops early

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


#: The msgpack bytes of `DataFrame(...)` up to its payload (a 2-element array and the tag):
#: the server encodes each item once, straight into its frame behind these.
DATA_FRAME_PREFIX = ENCODER.encode(DataFrame(msgspec.Raw(b"\xc0")))[:-1]


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
