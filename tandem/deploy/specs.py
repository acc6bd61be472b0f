"""What a child process of a local deployment is told: one typed message per child.

The supervisor encodes a spec to JSON and writes it to the child's stdin (not its command
line, which other users can read: the API key travels in it); `tandem.deploy.child` decodes
it with the same types, so a field renamed on one side fails loudly on the other instead of
becoming a flag nobody parses.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tandem.engine.config import EngineConfig
from tandem.frontend.disagg import DisaggConfig
from tandem.frontend.remote_engine import MIGRATION_LIMIT
from tandem.protocol.worker import DEFAULT_NAMESPACE, Role


class WorkerSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A `tandem worker`: an engine serving the request plane, found over NATS."""

    engine: EngineConfig  # `engine.model` is a resolved folder
    served: str
    nats: str
    role: Role = "aggregated"
    instance_id: str | None = None  # its discovery id (default: a fresh one)
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    insecure: bool = False
    namespace: str = DEFAULT_NAMESPACE
    lease_ttl: float | None = None
    drain_timeout: float = 30.0
    log_level: str = "info"


class FrontendSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A `tandem frontend`: the OpenAI HTTP server in front of the workers."""

    nats: str
    host: str = "127.0.0.1"
    port: int = 8000
    served: str | None = None  # default: the first worker's model card
    tokenizer: str | None = None  # default: the path in that card
    api_key: str | None = None
    max_waiting: int = 256
    max_request_bytes: int = 8 * 2**20
    max_client_rate: float = 0.0
    namespace: str = DEFAULT_NAMESPACE
    min_workers: int = 1
    min_prefill_workers: int = 0
    log_level: str = "info"
    policy: str = "kv"
    router_options: dict[str, Any] = msgspec.field(default_factory=dict)
    disagg: DisaggConfig = msgspec.field(default_factory=DisaggConfig)
    migration_limit: int = MIGRATION_LIMIT
    reuse_port: bool = False  # several frontend processes share `port`


SPECS: dict[str, type[WorkerSpec] | type[FrontendSpec]] = {
    "worker": WorkerSpec,
    "frontend": FrontendSpec,
}


def encode(spec: WorkerSpec | FrontendSpec) -> bytes:
    return msgspec.json.encode(spec)


def decode(kind: str, data: bytes) -> WorkerSpec | FrontendSpec:
    """The spec of a `kind` child; msgspec.ValidationError names a wrong or unknown field."""
    if kind not in SPECS:
        raise ValueError(f"unknown child kind {kind!r}; choose {', '.join(SPECS)}")
    return msgspec.json.decode(data, type=SPECS[kind])
