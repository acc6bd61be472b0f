"""What the frontend needs from an engine, as a structural type.

The frontend never imports `tandem.engine` (DESIGN.md: frontend and router never import the
engine), so the in-process `AsyncEngine`, a remote worker client or a router that fans out to
many workers can all stand behind the same HTTP server. Anything with these members will do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from tandem.protocol import GenerateOutput, GenerateRequest, LoadStats


@runtime_checkable
class EngineClient(Protocol):
    """The engine as the frontend sees it.

    `generate` streams `GenerateOutput` deltas until each of the request's `n` sequences has
    reported a finish reason. It raises ValueError, before yielding anything, for a request
    that can never be served. Closing the iterator early (break, cancellation) must abort the
    request and free its KV blocks; `abort` does the same on demand and is idempotent, which
    the frontend relies on when a stop string ends a sequence the engine would continue.
    """

    max_model_len: int
    max_logprobs: int

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]: ...

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop the request, or only its sequence `index` of `n`."""

    def stats(self) -> LoadStats: ...
