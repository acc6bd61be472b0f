"""Event plane: typed pub/sub with wildcards, in memory and over a real nats-server."""

from __future__ import annotations

import asyncio

import pytest
from nats_support import require_nats

from tandem.deploy.processes import NatsServer
from tandem.protocol import KvBlock, KvEvent, KvRemoved, KvStored, LoadStats
from tandem.runtime import MemoryEventPlane
from tandem.runtime.event_plane import subject_matches


def run(coro, timeout: float = 15.0):
    async def guarded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(guarded())


def load(active: int) -> LoadStats:
    return LoadStats(
        active_blocks=active,
        free_blocks=10,
        total_blocks=20,
        num_running=1,
        num_waiting=0,
        queued_prefill_tokens=0,
    )


@pytest.fixture(scope="module")
def nats_url():
    require_nats()
    with NatsServer() as server:
        yield server.url


@pytest.fixture(params=["memory", "nats"])
def make_plane(request):
    if request.param == "memory":
        shared = MemoryEventPlane()

        async def make():
            return shared

        return make
    url = request.getfixturevalue("nats_url")

    async def make_nats():
        from tandem.runtime.nats_event_plane import NatsEventPlane

        return await NatsEventPlane.connect(url)

    return make_nats


async def take(sub, n: int, timeout: float = 3.0) -> list:
    return [await asyncio.wait_for(sub.__anext__(), timeout) for _ in range(n)]


def test_subject_matching():
    assert subject_matches("a.b.c", "a.b.c")
    assert subject_matches("a.*.c", "a.x.c") and not subject_matches("a.*.c", "a.x.y.c")
    assert subject_matches("a.>", "a.b") and subject_matches("a.>", "a.b.c")
    assert not subject_matches("a.>", "a") and not subject_matches("a.b", "a.b.c")


def test_publish_subscribe_typed(make_plane):
    async def main():
        pub = await make_plane()
        sub_plane = await make_plane()
        kv_sub = await sub_plane.subscribe("tandem.test.kv_events.*", KvEvent)
        load_sub = await sub_plane.subscribe("tandem.test.load.>", LoadStats)
        other = await sub_plane.subscribe("tandem.other.>", LoadStats)
        await asyncio.sleep(0.05)  # let a NATS SUB reach the server before publishing

        stored = KvStored(
            event_id=0,
            parent_sequence_hash=None,
            blocks=[KvBlock(11, 12), KvBlock(13, 14)],
            tier="host",
        )
        removed = KvRemoved(event_id=1, sequence_hashes=[11])
        await pub.publish("tandem.test.kv_events.w1", stored)
        await pub.publish("tandem.test.kv_events.w1", {"not": "an event"})  # skipped, logged
        await pub.publish("tandem.test.kv_events.w1", removed)
        for i in range(3):
            await pub.publish(f"tandem.test.load.w{i}", load(i))

        assert await take(kv_sub, 2) == [stored, removed]
        loads = await take(load_sub, 3)
        assert [x.active_blocks for x in loads] == [0, 1, 2]
        assert all(isinstance(x, LoadStats) for x in loads)

        await kv_sub.unsubscribe()
        await pub.publish("tandem.test.kv_events.w1", removed)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(kv_sub.__anext__(), 1.0)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(other.__anext__(), 0.1)
        await load_sub.unsubscribe()
        await other.unsubscribe()
        await pub.close()
        await sub_plane.close()

    run(main())


def test_memory_slow_subscriber_drops_oldest():
    async def main():
        plane = MemoryEventPlane(max_pending=4)
        sub = await plane.subscribe("load", LoadStats)
        for i in range(10):
            await plane.publish("load", load(i))
        assert sub.dropped == 6
        assert [x.active_blocks for x in await take(sub, 4)] == [6, 7, 8, 9]
        await plane.close()

    run(main())
