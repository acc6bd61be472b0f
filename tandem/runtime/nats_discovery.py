"""Discovery over NATS: a JetStream key-value bucket whose entries are leases.

How leases work here, and why this way:

* Each instance's entry `namespace.component.endpoint.instance_id` is written with a
  **per-message TTL** (`Nats-TTL` header; nats-server 2.11+, the stream has `allow_msg_ttl`).
  The keepalive writes it again every `ttl / 3`; an entry not rewritten within `ttl` is removed
  by the server. Per-message TTL (rather than the bucket's `max_age`) lets every instance pick its
  own lease length without the bucket's config having to agree with anyone's.
* The bucket has a **subject delete marker TTL** (`limit_marker_ttl`): when the server expires an
  entry it leaves a delete marker (header `Nats-Marker-Reason: MaxAge`) that watchers receive,
  so a dead instance shows up as `removed` promptly. With a plain bucket `max_age`, or without
  markers, an expired key vanishes silently and every watcher would have to run its own timers.
  Markers expire themselves after `MARKER_TTL`, so tombstones do not pile up; graceful
  deregistration uses a purge with the same TTL for the same reason.
* Watching uses nats-py's KV watch (an ordered consumer, last value per key first, then
  updates). Heartbeats arrive as updates with an unchanged value; the watcher only reports
  changes. After a NATS reconnect the watcher is rebuilt and its view diffed against the server's,
  so changes missed while disconnected (expiries, new instances) are reported exactly once;
  while NATS is unreachable the last known membership is kept (the request plane does not go
  through NATS, so the instances are most likely still serving).
* On reconnect every lease is rewritten at once (and the bucket recreated if the server came
  back without its store), so membership recovers without waiting for a heartbeat.

The server's TTL resolution is one second: lease TTLs are rounded up to whole seconds.
Needs nats-server 2.11+ (per-message TTL, markers; 2.11.1+ places markers for per-message TTL
expiry) and nats-py 2.16+ (`limit_marker_ttl`, marker headers in KV watch).

Cost: every renewal reaches every watcher of its prefix (the watcher drops unchanged values),
i.e. about 3 messages per instance per TTL per watcher; fine for hundreds of instances, and the
reason the default TTL is seconds rather than sub-second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator

import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from tandem.runtime.discovery import DEFAULT_LEASE_TTL, Discovery, DiscoveryEvent, Lease
from tandem.runtime.messages import InstanceInfo
from tandem.runtime.nats_client import NatsConnection

log = logging.getLogger(__name__)

DEFAULT_BUCKET = "tandem_discovery"
#: How long the server keeps the delete marker of an expired or deregistered entry.
MARKER_TTL = 10
#: How often an idle watcher checks whether the connection was re-established.
_RESYNC_POLL = 0.25

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(InstanceInfo)


class NatsDiscovery(Discovery):
    """Discovery backed by a JetStream KV bucket (see the module docstring for the lease scheme)."""

    def __init__(
        self,
        conn: NatsConnection,
        *,
        bucket: str = DEFAULT_BUCKET,
        default_ttl: float = DEFAULT_LEASE_TTL,
        owns_connection: bool = False,
    ) -> None:
        super().__init__(default_ttl)
        self._conn = conn
        self._bucket = bucket
        self._kv: KeyValue | None = None
        self._bucket_lock = asyncio.Lock()
        self._owns_connection = owns_connection
        conn.add_reconnect_listener(self._on_reconnect)

    @classmethod
    async def connect(
        cls, url: str, *, bucket: str = DEFAULT_BUCKET, default_ttl: float = DEFAULT_LEASE_TTL
    ) -> NatsDiscovery:
        """Connect to NATS at `url` with a connection of its own, closed by `close()`."""
        conn = await NatsConnection.connect(url, name="tandem-discovery")
        self = cls(conn, bucket=bucket, default_ttl=default_ttl, owns_connection=True)
        await self._get_kv()
        return self

    async def close(self) -> None:
        await super().close()
        self._conn.remove_reconnect_listener(self._on_reconnect)
        if self._owns_connection:
            await self._conn.close()

    # ---- bucket ----------------------------------------------------------------------------

    async def _get_kv(self) -> KeyValue:
        async with self._bucket_lock:
            if self._kv is None:
                self._kv = await self._create_bucket()
            return self._kv

    async def _create_bucket(self) -> KeyValue:
        js = self._conn.js
        try:
            return await js.create_key_value(
                bucket=self._bucket, history=1, limit_marker_ttl=MARKER_TTL
            )
        except nats.js.errors.KeyValueLimitMarkerTTLNotSupportedError:
            raise RuntimeError(
                "tandem discovery needs nats-server 2.11 or newer (per-message TTL and delete "
                "markers); upgrade nats-server"
            ) from None
        except nats.js.errors.BadRequestError as exc:
            # Exists with another config (say, made by hand): use it if it can do leases.
            kv = await js.key_value(self._bucket)
            status = await kv.status()
            config = status.stream_info.config
            if not config.allow_msg_ttl or not config.subject_delete_marker_ttl:
                raise RuntimeError(
                    f"NATS bucket {self._bucket!r} exists without per-message TTL and delete "
                    f"markers ({exc}); delete it or pick another bucket name"
                ) from exc
            return kv

    # ---- leases ----------------------------------------------------------------------------

    async def _renew(self, lease: Lease) -> None:
        kv = await self._get_kv()
        subject = f"$KV.{self._bucket}.{lease.instance.key}"
        headers = {"Nats-TTL": str(max(1, math.ceil(lease.ttl)))}
        data = _encoder.encode(lease.instance)
        try:
            await self._conn.js.publish(subject, data, headers=headers, timeout=max(1.0, lease.ttl))
        except nats.js.errors.NoStreamResponseError:
            # The server came back without its store: the bucket is gone. Recreate and retry.
            if self._kv is kv:
                self._kv = None
            await self._get_kv()
            await self._conn.js.publish(subject, data, headers=headers, timeout=max(1.0, lease.ttl))

    async def _delete(self, instance: InstanceInfo) -> None:
        kv = await self._get_kv()
        await kv.purge(instance.key, msg_ttl=MARKER_TTL)

    async def _on_reconnect(self) -> None:
        for lease in list(self._leases.values()):
            try:
                await self._renew(lease)
            except Exception as exc:
                log.warning("re-registering %s after reconnect failed: %s", lease.instance.key, exc)

    # ---- reading ---------------------------------------------------------------------------

    async def list(self, prefix: str = "") -> list[InstanceInfo]:
        kv = await self._get_kv()
        watcher = await kv.watch(_subject(prefix), ignore_deletes=True)
        try:
            found: dict[str, InstanceInfo] = {}
            while (entry := await watcher.updates(timeout=5.0)) is not None:
                info = _decode(entry)
                if info is not None:
                    found[entry.key] = info
            return list(found.values())
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def watch(self, prefix: str = "") -> AsyncIterator[DiscoveryEvent]:
        known: dict[str, InstanceInfo] = {}
        failures = 0
        while not self._conn.nc.is_closed:
            generation = self._conn.generation
            try:
                kv = await self._get_kv()
                watcher = await kv.watch(_subject(prefix))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if failures == 0:
                    log.warning("discovery watch %r: cannot watch (%s); retrying", prefix, exc)
                failures += 1
                if isinstance(exc, nats.js.errors.NotFoundError):
                    self._kv = None
                await asyncio.sleep(min(2.0, 0.1 * failures))
                continue
            failures = 0
            try:
                async for event in self._follow(watcher, generation, known):
                    yield event
            finally:
                with contextlib.suppress(Exception):
                    await watcher.stop()

    async def _follow(
        self, watcher: KeyValue.KeyWatcher, generation: int, known: dict[str, InstanceInfo]
    ) -> AsyncIterator[DiscoveryEvent]:
        """Report one watcher's initial set (diffed against `known`) and then its updates;
        return when the connection was re-established and a fresh watcher is needed."""
        snapshot: dict[str, InstanceInfo] | None = {}
        while True:
            try:
                entry = await watcher.updates(timeout=_RESYNC_POLL)
            except nats.errors.TimeoutError:
                if self._conn.generation != generation or self._conn.nc.is_closed:
                    return
                continue
            if entry is None:  # end of the initial set
                if snapshot is not None:
                    for key in [k for k in known if k not in snapshot]:
                        yield DiscoveryEvent("removed", known.pop(key))
                    for key, info in snapshot.items():
                        if known.get(key) != info:
                            known[key] = info
                            yield DiscoveryEvent("added", info)
                    snapshot = None
                continue
            info = _decode(entry)
            if snapshot is not None:
                if info is None:
                    snapshot.pop(entry.key, None)
                else:
                    snapshot[entry.key] = info
            elif info is None:
                old = known.pop(entry.key, None)
                if old is not None:
                    yield DiscoveryEvent("removed", old)
            elif known.get(entry.key) != info:
                known[entry.key] = info
                yield DiscoveryEvent("added", info)


def _subject(prefix: str) -> str:
    return f"{prefix}.>" if prefix else ">"


def _decode(entry: KeyValue.Entry) -> InstanceInfo | None:
    """The entry's instance, or None for a deletion (or an undecodable value, logged)."""
    if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
        return None
    try:
        return _decoder.decode(entry.value)
    except msgspec.DecodeError as exc:
        log.error("discovery: ignoring undecodable entry %r: %s", entry.key, exc)
        return None
