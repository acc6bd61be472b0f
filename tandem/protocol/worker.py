"""What a worker tells the rest of the system about itself: its model card, its load, its KV
events, and the event-plane subjects they travel on.

These live in `protocol` (not `worker`) because the frontend and the router read them and
must not import the worker (which imports the engine).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from tandem.protocol.events import KvEvent, LoadStats
from tandem.protocol.transfer import KvLayout, NixlCache

Role = Literal["aggregated", "prefill", "decode"]

DEFAULT_NAMESPACE = "tandem"
WORKER_COMPONENT = "backend"
GENERATE_ENDPOINT = "generate"
#: Served beside `generate` on the same request plane; routers that lost events call it.
KV_SNAPSHOT_ENDPOINT = "kv_snapshot"


class KvSnapshotRequest(msgspec.Struct):
    """Ask a worker for a `KvSnapshot` (no parameters)."""


#: Stops one of a request's `n` sequences; a stream can only be cancelled whole.
CANCEL_ENDPOINT = "cancel"


class CancelSequence(msgspec.Struct):
    request_id: str
    index: int


class Cancelled(msgspec.Struct):
    """The worker passed the cancel on to its engine (harmless if the sequence had ended)."""


class ModelCard(msgspec.Struct, kw_only=True, frozen=True):
    """What callers need to know before sending a worker requests.

    Stored in discovery as the instance's `metadata`. `model` is the served model name, the
    one clients send; `tokenizer` is a path valid on the worker's machine (a frontend on
    another machine passes its own `--tokenizer`). Two workers may serve the same requests
    only if `model` and `block_size` agree (block hashes depend on the block size); a prefill
    and a decode worker may pair up only if their `kv_layout`s are equal as well.
    """

    model: str
    model_path: str
    tokenizer: str
    block_size: int
    total_blocks: int
    max_model_len: int
    max_logprobs: int
    role: Role = "aggregated"
    kv_layout: KvLayout | None = None
    #: A prefill worker's CUDA IPC handles, hashed: decode workers map only handles that
    #: match the registered digest.
    kv_ipc_digest: str = ""
    #: How this worker moves KV blocks, in its order of preference ("cuda-ipc", "nixl",
    #: "tcp"): a prefill worker serves them, a decode worker pulls with them. A pair needs
    #: one in common.
    kv_transports: list[str] = msgspec.field(default_factory=lambda: ["tcp"])
    #: A prefill worker's caches as its NIXL agent registered them (with "nixl").
    kv_nixl: NixlCache | None = None
    #: The engine's own KV connector when KV moves through it (a vLLM worker's, e.g.
    #: "NixlConnector"), not through Tandem's transfer; "" for Tandem's engine.
    kv_connector: str = ""

    def to_metadata(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> ModelCard:
        """Raises msgspec.ValidationError if `metadata` is not a model card."""
        return msgspec.convert(metadata, cls)

    def mismatch(self, other: ModelCard) -> str | None:
        """Why `other` cannot serve alongside this card's workers, or None if it can."""
        if other.model != self.model:
            return f"model {other.model!r} != {self.model!r}"
        if other.block_size != self.block_size:
            return f"block size {other.block_size} != {self.block_size}"
        return None

    def kv_mismatch(self, other: ModelCard) -> str | None:
        """Why this worker and `other` cannot exchange KV blocks, or None if they can."""
        if self.kv_connector or other.kv_connector:
            if self.kv_connector == other.kv_connector:
                return None
            mine, theirs = (
                c or "Tandem's KV transfer" for c in (self.kv_connector, other.kv_connector)
            )
            return f"KV moves through {theirs}, not {mine}"
        if self.kv_layout is None or other.kv_layout is None:
            return "a worker does not describe its KV cache layout"
        if not set(self.kv_transports) & set(other.kv_transports):
            return (
                f"no KV transport in common: it uses {', '.join(other.kv_transports)},"
                f" these workers {', '.join(self.kv_transports)} (--kv-transport)"
            )
        return self.kv_layout.mismatch(other.kv_layout)


class WorkerLoad(msgspec.Struct, kw_only=True):
    """A worker's `LoadStats`, tagged with its instance id so one wildcard subscription
    (`<namespace>.load.*`) can follow every worker."""

    worker_id: str
    stats: LoadStats


class KvEventBatch(msgspec.Struct, kw_only=True):
    """The KV events a worker produced since its previous batch, in `event_id` order."""

    worker_id: str
    events: list[KvEvent]


def load_subject(namespace: str, worker_id: str = "*") -> str:
    """Subject of a worker's load figures (`*`: every worker's)."""
    return f"{namespace}.load.{worker_id}"


def kv_events_subject(namespace: str, worker_id: str = "*") -> str:
    """Subject of a worker's KV event batches (`*`: every worker's)."""
    return f"{namespace}.kv_events.{worker_id}"
