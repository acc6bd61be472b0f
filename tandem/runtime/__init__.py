"""The distributed runtime: addressing, discovery with leases, request plane, event plane.

Every piece has an in-memory implementation (embedded mode: one process, no external service)
and a distributed one (NATS for discovery and events, direct TCP for request streams), behind
the same interface, so components do not care which mode they run in.

NATS-backed classes live in `nats_discovery` / `nats_event_plane` and are not imported here, so
embedded mode does not need `nats-py` loaded.
"""

from tandem.runtime.addressing import EndpointId, new_instance_id
from tandem.runtime.discovery import (
    DEFAULT_LEASE_TTL,
    Discovery,
    DiscoveryEvent,
    Lease,
    MemoryDiscovery,
)
from tandem.runtime.errors import (
    EndpointNotFound,
    FrameTooLarge,
    PeerGone,
    RemoteError,
    RuntimeFailure,
)
from tandem.runtime.event_plane import EventPlane, MemoryEventPlane, Subscription
from tandem.runtime.local_plane import LocalRequestClient, LocalRequestPlane, LocalRequestServer
from tandem.runtime.messages import InstanceInfo
from tandem.runtime.request_plane import RequestClient, RequestServer, ResponseStream
from tandem.runtime.tcp_client import TcpRequestClient
from tandem.runtime.tcp_server import TcpRequestServer

__all__ = [
    "DEFAULT_LEASE_TTL",
    "Discovery",
    "DiscoveryEvent",
    "EndpointId",
    "EndpointNotFound",
    "EventPlane",
    "FrameTooLarge",
    "InstanceInfo",
    "Lease",
    "LocalRequestClient",
    "LocalRequestPlane",
    "LocalRequestServer",
    "MemoryDiscovery",
    "MemoryEventPlane",
    "PeerGone",
    "RemoteError",
    "RequestClient",
    "RequestServer",
    "ResponseStream",
    "RuntimeFailure",
    "Subscription",
    "TcpRequestClient",
    "TcpRequestServer",
    "new_instance_id",
]
