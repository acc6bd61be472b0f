"""Discovery: who is running, where, kept honest by leases.

An instance registers its `InstanceInfo` and gets a `Lease`; the lease stays valid only while it
is renewed (the `Lease` renews itself every `ttl / 3` by default). A process that dies, hangs or
loses its network stops renewing, and its entry disappears within one TTL, so callers stop
routing to it without anyone having to say so. Watchers get the current set first and then every
change, which is what a frontend or router needs to keep a live instance table.

This module holds the interface, the `Lease` shared by all implementations, and the in-memory
implementation used in embedded (single-process) mode. `nats_discovery` holds the distributed one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import Literal

import msgspec

from tandem.runtime.addressing import prefix_matches
from tandem.runtime.messages import InstanceInfo

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL = 3.0


class DiscoveryEvent(msgspec.Struct, frozen=True):
    """`added` (also sent again when an instance's info changes) or `removed`."""

    kind: Literal["added", "removed"]
    instance: InstanceInfo


class Lease:
    """A registration kept alive by renewal. Revoke it to deregister at once (graceful drain);
    drop the process and it lapses by itself within `ttl`."""

    def __init__(self, owner: Discovery, instance: InstanceInfo, ttl: float, keepalive: bool):
        self.instance = instance
        self.ttl = ttl
        self._owner = owner
        self._revoked = False
        self._task: asyncio.Task[None] | None = None
        if keepalive:
            self._task = asyncio.get_running_loop().create_task(
                self._keepalive(), name=f"lease-keepalive-{instance.key}"
            )

    @property
    def revoked(self) -> bool:
        return self._revoked

    async def renew(self) -> None:
        """Refresh the lease now (the keepalive task does this every ttl/3)."""
        if not self._revoked:
            await self._owner._renew(self)

    def stop_keepalive(self) -> None:
        """Stop renewing without deregistering: the lease then lapses after `ttl`, exactly as if
        the process had hung. Meant for tests and for simulating failures."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def revoke(self) -> None:
        """Deregister now; watchers see `removed` at once rather than after a TTL."""
        if self._revoked:
            return
        self._revoked = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._owner._remove(self)

    async def _keepalive(self) -> None:
        period = self.ttl / 3
        failing = False
        while True:
            await asyncio.sleep(period)
            try:
                await self._owner._renew(self)
                if failing:
                    log.info("lease %s: renewed again", self.instance.key)
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep trying: the backend may come back within the TTL
                if not failing:
                    log.warning("lease %s: renewal failed (%s); retrying", self.instance.key, exc)
                failing = True


class Discovery(ABC):
    """Register instances under leases; list and watch them by dotted key prefix.

    Keys are `namespace.component.endpoint.instance_id`; a prefix matches whole parts
    (`ns`, `ns.backend`, `ns.backend.generate`); `''` matches everything.
    """

    def __init__(self, default_ttl: float = DEFAULT_LEASE_TTL) -> None:
        if default_ttl <= 0:
            raise ValueError("lease ttl must be positive")
        self.default_ttl = default_ttl
        self._leases: dict[str, Lease] = {}

    async def register(
        self, instance: InstanceInfo, *, ttl: float | None = None, keepalive: bool = True
    ) -> Lease:
        """Register `instance` under a lease of `ttl` seconds (default: `default_ttl`)."""
        ttl = self.default_ttl if ttl is None else ttl
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        old = self._leases.get(instance.key)
        if old is not None:  # re-registration (new metadata): the old lease is superseded
            old.stop_keepalive()
            old._revoked = True
        lease = Lease(self, instance, ttl, keepalive)
        self._leases[instance.key] = lease
        try:
            await self._renew(lease)
        except BaseException:
            lease.stop_keepalive()
            self._leases.pop(instance.key, None)
            raise
        return lease

    async def deregister(self, instance: InstanceInfo) -> None:
        """Remove `instance` now (same as revoking its lease)."""
        lease = self._leases.get(instance.key)
        if lease is not None:
            await lease.revoke()

    async def close(self) -> None:
        """Revoke every lease this object holds and release its resources."""
        for lease in list(self._leases.values()):
            with contextlib.suppress(Exception):
                await lease.revoke()

    @abstractmethod
    async def list(self, prefix: str = "") -> list[InstanceInfo]:
        """The instances registered under `prefix` now."""

    @abstractmethod
    def watch(self, prefix: str = "") -> AsyncIterator[DiscoveryEvent]:
        """`added` for every current instance under `prefix`, then every change, until closed.
        Close it (`aclose()` or `contextlib.aclosing`) to stop watching."""

    @abstractmethod
    async def _renew(self, lease: Lease) -> None:
        """Write (or refresh) the lease's entry so it lives `lease.ttl` more seconds."""

    async def _remove(self, lease: Lease) -> None:
        if self._leases.get(lease.instance.key) is lease:  # not if superseded meanwhile
            del self._leases[lease.instance.key]
            await self._delete(lease.instance)

    @abstractmethod
    async def _delete(self, instance: InstanceInfo) -> None:
        """Remove the instance's entry."""


class MemoryDiscovery(Discovery):
    """In-process discovery for embedded mode: a dict with expiry times on a monotonic clock.

    Leases work as in the distributed implementation (an entry not renewed within its TTL is
    reaped and watchers see `removed`), so components behave the same in both modes.
    """

    def __init__(
        self, default_ttl: float = DEFAULT_LEASE_TTL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(default_ttl)
        self._clock = clock
        self._entries: dict[str, tuple[InstanceInfo, float]] = {}
        self._watchers: set[tuple[str, asyncio.Queue[DiscoveryEvent]]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def list(self, prefix: str = "") -> list[InstanceInfo]:
        self._reap()
        return [info for key, (info, _) in self._entries.items() if prefix_matches(prefix, key)]

    async def watch(self, prefix: str = "") -> AsyncIterator[DiscoveryEvent]:
        self._reap()
        queue: asyncio.Queue[DiscoveryEvent] = asyncio.Queue()
        for key, (info, _) in self._entries.items():
            if prefix_matches(prefix, key):
                queue.put_nowait(DiscoveryEvent("added", info))
        watcher = (prefix, queue)
        self._watchers.add(watcher)
        try:
            while True:
                yield await queue.get()
        finally:
            self._watchers.discard(watcher)

    async def close(self) -> None:
        await super().close()
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None

    async def _renew(self, lease: Lease) -> None:
        info = lease.instance
        old = self._entries.get(info.key)
        self._entries[info.key] = (info, self._clock() + lease.ttl)
        if old is None or old[0] != info:
            self._notify(DiscoveryEvent("added", info))
        self._ensure_reaper()
        self._wake.set()

    async def _delete(self, instance: InstanceInfo) -> None:
        entry = self._entries.pop(instance.key, None)
        if entry is not None:
            self._notify(DiscoveryEvent("removed", entry[0]))

    def _notify(self, event: DiscoveryEvent) -> None:
        for prefix, queue in self._watchers:
            if prefix_matches(prefix, event.instance.key):
                queue.put_nowait(event)

    def _reap(self) -> float | None:
        """Drop expired entries; return the seconds until the next expiry (None: no entries)."""
        now = self._clock()
        for key, (info, expires) in list(self._entries.items()):
            if expires <= now:
                del self._entries[key]
                log.info("discovery: lease of %s expired", key)
                self._notify(DiscoveryEvent("removed", info))
        if not self._entries:
            return None
        return max(0.0, min(exp for _, exp in self._entries.values()) - now)

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())

    async def _reap_loop(self) -> None:
        while True:
            delay = self._reap()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                # +1 ms: wake just after the expiry, not just before it.
                await asyncio.wait_for(self._wake.wait(), None if delay is None else delay + 1e-3)
