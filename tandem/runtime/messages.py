"""Runtime messages that cross process boundaries: plain msgspec Structs, msgpack on the wire.

`InstanceInfo` is what discovery stores; the `*Frame` structs are the request plane's wire
protocol (see `tcp_plane` for how they are used), each the body of a frame whose header says
which stream it belongs to (`framing`). Frames are `array_like` with small integer
tags, so a streamed token costs a few bytes of envelope, and their payloads are `msgspec.Raw`
so the envelope is decoded once and the payload only by whoever knows its type.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tandem.runtime.addressing import EndpointId, validate_name


class InstanceInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One running copy of a component's endpoint, as registered in discovery.

    `address` is where its request plane listens: `host:port` for TCP, `inproc:<id>` for the
    embedded in-process plane. `metadata` carries what callers select on (the worker's model
    card: model name, block size, role, ...).
    """

    namespace: str
    component: str
    endpoint: str
    instance_id: str
    address: str
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_name(self.namespace, "namespace")
        validate_name(self.component, "component")
        validate_name(self.endpoint, "endpoint")
        validate_name(self.instance_id, "instance_id")

    @property
    def endpoint_id(self) -> EndpointId:
        return EndpointId(self.namespace, self.component, self.endpoint)

    @property
    def key(self) -> str:
        """The discovery key: `namespace.component.endpoint.instance_id`."""
        return f"{self.namespace}.{self.component}.{self.endpoint}.{self.instance_id}"


# ---- request plane wire protocol -------------------------------------------------------------


class RequestFrame(msgspec.Struct, tag=1, array_like=True):
    """Open the frame's stream on `endpoint`. `timeout` is the seconds left until the caller's
    deadline (relative, because clocks differ between hosts); `window` is the initial credit."""

    endpoint: str
    payload: msgspec.Raw
    timeout: float | None
    window: int


class DataFrame(msgspec.Struct, tag=2, array_like=True):
    """One response item of a stream."""

    payload: msgspec.Raw


class EndFrame(msgspec.Struct, tag=3, array_like=True):
    """The handler finished normally: no more items."""



class ErrorFrame(msgspec.Struct, tag=4, array_like=True):
    """The stream ended with an error. `code`: handler_error, no_endpoint, bad_request,
    deadline, overloaded, frame_too_large, shutdown."""

    code: str
    message: str


class CancelFrame(msgspec.Struct, tag=5, array_like=True):
    """The caller is no longer interested: cancel the handler."""



class CreditFrame(msgspec.Struct, tag=6, array_like=True):
    """The caller consumed `n` more items: the server may send `n` more."""

    n: int


Frame = RequestFrame | DataFrame | EndFrame | ErrorFrame | CancelFrame | CreditFrame
