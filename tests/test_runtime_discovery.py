"""Discovery: register / list / watch / lease expiry / revoke, in memory and over a real
nats-server; and recovery after the NATS server restarts."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from nats_support import require_nats

from tandem.deploy.processes import NatsServer
from tandem.runtime import (
    DiscoveryEvent,
    InstanceInfo,
    MemoryDiscovery,
    PeerGone,
    TcpRequestClient,
    new_instance_id,
)
from tandem.runtime.testing import spawn_token_server


def run(coro, timeout: float = 20.0):
    async def guarded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(guarded())


def instance(component="backend", endpoint="generate", **metadata) -> InstanceInfo:
    return InstanceInfo(
        namespace="test",
        component=component,
        endpoint=endpoint,
        instance_id=new_instance_id(),
        address="127.0.0.1:1",
        metadata=metadata,
    )


class Watcher:
    """Collects a watch's events in the background; `wait_for` polls for a condition."""

    def __init__(self, discovery, prefix: str) -> None:
        self.events: list[DiscoveryEvent] = []
        self.live: dict[str, InstanceInfo] = {}
        self._iter = discovery.watch(prefix)
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def _collect(self) -> None:
        async for event in self._iter:
            self.events.append(event)
            if event.kind == "added":
                self.live[event.instance.key] = event.instance
            else:
                self.live.pop(event.instance.key, None)

    async def wait_for(self, predicate, timeout: float = 5.0) -> float:
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > timeout:
                raise AssertionError(f"condition not met in {timeout}s; events: {self.events}")
            await asyncio.sleep(0.01)
        return time.monotonic() - start

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._iter.aclose()


@pytest.fixture(scope="module")
def nats_server():
    require_nats()
    with NatsServer() as server:
        yield server


async def make_memory(ttl: float):
    return MemoryDiscovery(default_ttl=ttl)


def make_nats(url: str, bucket: str):
    from tandem.runtime.nats_discovery import NatsDiscovery

    async def make(ttl: float):
        return await NatsDiscovery.connect(url, bucket=bucket, default_ttl=ttl)

    return make


@pytest.fixture(params=["memory", "nats"])
def factory(request):
    """Returns (make_discovery(ttl), shared): `shared` means two made objects see each other."""
    if request.param == "memory":
        shared: dict = {}

        async def make(ttl: float):
            # One in-memory registry stands in for the shared service.
            if "d" not in shared:
                shared["d"] = await make_memory(ttl)
            return shared["d"]

        return make
    server = request.getfixturevalue("nats_server")
    return make_nats(server.url, bucket=f"t{new_instance_id()}")


def test_register_list_watch_revoke(factory):
    async def main():
        owner = await factory(2.0)
        observer = await factory(2.0)
        a = instance(model="m1")
        b = instance()
        other = instance(component="frontend", endpoint="http")
        lease_a = await owner.register(a)
        watcher = Watcher(observer, "test.backend")
        await watcher.wait_for(lambda: a.key in watcher.live)
        await owner.register(b)
        await owner.register(other)
        await watcher.wait_for(lambda: b.key in watcher.live)
        assert watcher.live[a.key] == a and watcher.live[a.key].metadata == {"model": "m1"}
        assert {i.key for i in await observer.list("test.backend.generate")} == {a.key, b.key}
        assert {i.key for i in await observer.list("test")} == {a.key, b.key, other.key}
        assert await observer.list("test.back") == []  # prefixes match whole parts

        # Heartbeats do not show up as changes; changed metadata does.
        await asyncio.sleep(0.8)
        assert [e.kind for e in watcher.events] == ["added", "added"]
        a2 = InstanceInfo(
            **{**{f: getattr(a, f) for f in a.__struct_fields__}, "metadata": {"model": "m2"}}
        )
        old_lease, lease_a = lease_a, await owner.register(a2)
        await watcher.wait_for(lambda: watcher.live[a.key].metadata == {"model": "m2"})
        await old_lease.revoke()  # superseded: must not remove the new registration
        assert a.key in {i.key for i in await observer.list("test")}

        # Revoking removes at once, not after a TTL.
        await lease_a.revoke()
        await watcher.wait_for(lambda: a.key not in watcher.live, timeout=1.0)
        assert {i.key for i in await observer.list("test.backend")} == {b.key}
        await watcher.close()
        await owner.close()
        await observer.close()

    run(main())


def test_dead_instance_disappears_within_ttl(factory):
    async def main():
        owner = await factory(1.0)
        observer = await factory(1.0)
        alive, dead = instance(), instance()
        await owner.register(alive)
        lease = await owner.register(dead)
        watcher = Watcher(observer, "test")
        await watcher.wait_for(lambda: dead.key in watcher.live and alive.key in watcher.live)
        await asyncio.sleep(1.5)  # several TTLs of keepalive: still there
        assert dead.key in watcher.live
        lease.stop_keepalive()  # the process hangs or dies: no more renewals
        took = await watcher.wait_for(lambda: dead.key not in watcher.live, timeout=4.0)
        # TTL 1 s from the last renewal (≤ ttl/3 before the stop); the NATS server's TTL timer
        # has about one second of resolution.
        assert took < 3.0
        assert alive.key in watcher.live
        assert [i.key for i in await observer.list("test")] == [alive.key]
        await watcher.close()
        await owner.close()
        await observer.close()

    run(main())


def test_memory_lease_expiry_fine_grained():
    async def main():
        disc = MemoryDiscovery(default_ttl=0.2)
        watcher = Watcher(disc, "")
        a = instance()
        lease = await disc.register(a)
        await watcher.wait_for(lambda: a.key in watcher.live)
        await asyncio.sleep(0.5)
        assert a.key in watcher.live  # renewed every ttl/3
        lease.stop_keepalive()
        took = await watcher.wait_for(lambda: a.key not in watcher.live, timeout=1.0)
        assert took <= 0.3
        # Renewing explicitly (keepalive=False) is the other way to hold a lease.
        b = instance()
        manual = await disc.register(b, ttl=0.2, keepalive=False)
        for _ in range(4):
            await asyncio.sleep(0.1)
            await manual.renew()
        assert [i.key for i in await disc.list()] == [b.key]
        await watcher.close()
        await disc.close()
        assert await disc.list() == []

    run(main())


def test_nats_discovery_and_events_recover_after_server_restart():
    require_nats()
    from tandem.protocol import KvCleared
    from tandem.runtime.nats_discovery import NatsDiscovery
    from tandem.runtime.nats_event_plane import NatsEventPlane

    server = NatsServer()
    server.start()
    try:

        async def main():
            owner = await NatsDiscovery.connect(server.url, default_ttl=2.0)
            observer = await NatsDiscovery.connect(server.url, default_ttl=2.0)
            before = instance()
            await owner.register(before)
            watcher = Watcher(observer, "test")
            await watcher.wait_for(lambda: before.key in watcher.live)
            events = await NatsEventPlane.connect(server.url)
            sub = await events.subscribe("tandem.test.kv", KvCleared)

            await asyncio.to_thread(server.stop)
            await asyncio.sleep(0.5)
            assert before.key in watcher.live  # the last known view is kept during the outage
            await asyncio.to_thread(server.start)

            # After the restart: the old lease is kept alive, new registrations and expiries
            # are seen by the same watcher, without anyone re-creating anything.
            after = instance()
            for _ in range(100):
                try:
                    lease_after = await owner.register(after)
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            await watcher.wait_for(lambda: after.key in watcher.live, timeout=5.0)
            lease_after.stop_keepalive()
            await watcher.wait_for(lambda: after.key not in watcher.live, timeout=5.0)
            await asyncio.sleep(2.5)  # longer than the TTL: `before` is still being renewed
            assert before.key in watcher.live
            assert {i.key for i in await observer.list("test")} == {before.key}
            # The event plane's subscription came back by itself too.
            await events.publish("tandem.test.kv", KvCleared(event_id=7))
            assert (await asyncio.wait_for(sub.__anext__(), 3.0)).event_id == 7
            await events.close()
            await watcher.close()
            await owner.close()
            await observer.close()

        run(main(), timeout=30.0)
    finally:
        server.close()


def test_killed_process_fails_its_streams_and_leaves_discovery(nats_server):
    """The reliability case end to end: a serving process registered in NATS is SIGKILLed
    mid-stream; its caller gets PeerGone at once, and discovery drops it within the TTL."""
    from tandem.runtime.nats_discovery import NatsDiscovery

    proc, address, instance_id = spawn_token_server(delay=0.01, nats_url=nats_server.url, ttl=1)
    try:

        async def main():
            observer = await NatsDiscovery.connect(nats_server.url)
            watcher = Watcher(observer, "test.tokens")
            await watcher.wait_for(
                lambda: any(i.instance_id == instance_id for i in watcher.live.values())
            )
            [info] = [i for i in watcher.live.values() if i.instance_id == instance_id]
            assert info.address == address
            client = TcpRequestClient()
            got = []
            with pytest.raises(PeerGone):
                async for x in client.call(info.address, "tokens", {}):
                    got.append(x)
                    if len(got) == 3:
                        proc.kill()
            gone = await watcher.wait_for(lambda: info.key not in watcher.live, timeout=4.0)
            assert gone < 3.0  # TTL 1 s + the server's ~1 s timer resolution
            await client.close()
            await watcher.close()
            await observer.close()

        run(main())
    finally:
        proc.kill()
        proc.wait()
