"""Names of things in the runtime: `namespace.component.endpoint`, and instance ids.

A *component* (say `backend`) exposes *endpoints* (say `generate`); each running copy of it is an
*instance* with a random 64-bit id. Names are restricted to characters that are valid both as NATS
subject tokens and as JetStream key-value keys, so the same string works as a discovery key, an
event subject and a log label without escaping.
"""

from __future__ import annotations

import re
import secrets

import msgspec

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def validate_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a valid address part, else raise ValueError naming `what`."""
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid {what} {name!r}: use letters, digits, '_' and '-' only")
    return name


def new_instance_id() -> str:
    """A fresh instance id: 64 random bits as 16 hex digits (collisions are not a concern)."""
    return secrets.token_hex(8)


class EndpointId(msgspec.Struct, frozen=True):
    """`namespace.component.endpoint`: what a caller asks for before picking an instance."""

    namespace: str
    component: str
    endpoint: str

    def __post_init__(self) -> None:
        validate_name(self.namespace, "namespace")
        validate_name(self.component, "component")
        validate_name(self.endpoint, "endpoint")

    @classmethod
    def parse(cls, text: str) -> EndpointId:
        """Parse `namespace.component.endpoint`."""
        parts = text.split(".")
        if len(parts) != 3:
            raise ValueError(f"endpoint {text!r} is not of the form namespace.component.endpoint")
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.namespace}.{self.component}.{self.endpoint}"

    @property
    def prefix(self) -> str:
        """The discovery prefix under which this endpoint's instances are registered."""
        return str(self)


def prefix_matches(prefix: str, key: str) -> bool:
    """Whether discovery `key` lies under dotted `prefix` ('' matches everything).

    Prefixes match whole dot-separated parts: `ns.back` does not match `ns.backend.generate.x`.
    """
    return not prefix or key == prefix or key.startswith(prefix + ".")
