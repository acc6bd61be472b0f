"""The exceptions the runtime raises to its callers, one class per thing a caller acts on.

A caller that gets `PeerGone` may retry on another instance; one that gets `RemoteError` saw the
remote handler fail (retrying elsewhere may or may not help); a deadline is the builtin
`TimeoutError`, so `asyncio` code handles it the usual way.
"""

from __future__ import annotations


class RuntimeFailure(Exception):
    """Base class of the runtime's own errors."""


class PeerGone(RuntimeFailure, ConnectionError):
    """The peer could not be reached, or its connection died while a stream was open."""


class RemoteError(RuntimeFailure):
    """The remote side ended the stream with an error; `code` says which kind."""

    def __init__(self, message: str, code: str = "handler_error") -> None:
        super().__init__(message)
        self.code = code


class EndpointNotFound(RemoteError):
    """The peer is up but hosts no endpoint of that name (a stale or mismatched address)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="no_endpoint")


class FrameTooLarge(RuntimeFailure, ValueError):
    """An outgoing message would exceed the request plane's maximum frame size."""
