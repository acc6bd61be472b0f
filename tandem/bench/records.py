"""What a benchmark sends (`RequestSpec`) and what it measures (`RequestRecord`).

Kept free of I/O so that workloads, the client, the runner and the report can
all share these two types without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Error kinds. A request has at most one; `None` means it succeeded.
ERROR_HTTP = "http"  # the server answered with a non-200 status (see `http_status`)
ERROR_TIMEOUT = "timeout"  # the request ran past --request-timeout
ERROR_CONNECTION = "connection"  # no response: refused, reset, DNS, ... before the headers
ERROR_STREAM = "stream"  # the SSE stream broke: bad JSON, error event, cut short, no tokens
ERROR_CLIENT = "client"  # the bench itself failed on this request (a bug: please report)
ERROR_CANCELLED = "cancelled"  # still in flight at the run's time bound (not a failure)

Content = list[int] | str
"""A prompt segment: token ids, or text (text appears for real answers in chat sessions)."""


@dataclass(slots=True)
class RequestSpec:
    """One request a workload wants sent.

    `segments` keeps the conversation structure (role, content) so that the same
    workload can be sent as a token-id completion (segments concatenated), a text
    completion, or a chat completion (one message per segment).
    """

    segments: list[tuple[str, Content]]
    input_tokens: int
    """Intended prompt length in tokens (exact for token-id prompts)."""
    max_tokens: int
    arrival_s: float | None = None
    """Send time relative to the run start, for trace arrival; None otherwise."""
    tags: dict[str, Any] = field(default_factory=dict)
    collect_text: bool = False
    """Keep the answer's text on the record (sessions in text/chat mode need it)."""


@dataclass(slots=True)
class RequestRecord:
    """Measurements of one request. Times are seconds; `start_s` is relative to run start."""

    index: int
    tags: dict[str, Any] = field(default_factory=dict)
    scheduled_s: float | None = None
    start_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int | None = None
    chunks: int = 0
    finish_reason: str | None = None
    error: str | None = None
    error_detail: str | None = None
    http_status: int | None = None
    # Not exported: the answer, for multi-turn sessions.
    output_text: str | None = None
    output_token_ids: list[int] | None = None
    # Not exported: arrival of each output chunk, seconds after the request was written, and
    # its token count where the server said (else None), for the spread of arrivals.
    chunk_times_s: list[float] | None = None
    chunk_tokens: list[int] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; times rounded to the microsecond to keep files small."""
        return {
            "index": self.index,
            "tags": self.tags,
            "scheduled_s": _r(self.scheduled_s),
            "start_s": _r(self.start_s),
            "ttft_s": _r(self.ttft_s),
            "e2e_s": _r(self.e2e_s),
            "itl_s": [round(x, 6) for x in self.itl_s],
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "chunks": self.chunks,
            "finish_reason": self.finish_reason,
            "error": self.error,
            "error_detail": self.error_detail,
            "http_status": self.http_status,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestRecord:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 6)
