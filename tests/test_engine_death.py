"""When the engine's step loop dies: every waiter fails (no hang), the worker leaves discovery
at once and its process exits non-zero, the supervisor restarts it with backoff; frontend calls
carry deadlines; the engine's KV-event buffer is bounded.

The loop is killed by injecting a failure into `EngineCore.step` (on the instance); a gate
(a threading.Event) holds the failing step until the test has queued what must be failed, so
nothing depends on timing. Waits have generous liveness bounds only.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest
from nats_support import needs_nats

from tandem.cli.main import parse_args
from tandem.cli.serve import local_specs
from tandem.deploy import supervisor
from tandem.deploy.processes import NatsServer
from tandem.engine import async_engine
from tandem.engine.async_engine import AsyncEngine, EngineDeadError
from tandem.engine.config import EngineConfig
from tandem.frontend.remote_engine import RemoteEngine, WorkerLost
from tandem.protocol import GenerateRequest, KvStored, SamplingParams
from tandem.router.index import KvIndex
from tandem.runtime import MemoryDiscovery, MemoryEventPlane, TcpRequestClient, TcpRequestServer
from tandem.worker import Worker, model_card

LIVENESS = 10.0  # seconds: only ever a bound on a hang, never a measurement


def make_engine(model, **kw) -> AsyncEngine:
    return AsyncEngine(EngineConfig(model=str(model), engine="mock", num_gpu_blocks=64, **kw))


def request(rid: str, max_tokens: int = 8, first: int = 1) -> GenerateRequest:
    """A 40-token prompt; a different `first` gives different blocks (the vocab is 384)."""
    return GenerateRequest(
        request_id=rid,
        prompt_token_ids=[(first + 7 * i) % 383 + 1 for i in range(40)],
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0),
    )


class StepGate:
    """Replaces the engine's step: the next step signals `entered`, waits for `release`,
    then raises (`fail`) or runs the real step."""

    def __init__(self, engine: AsyncEngine, fail: bool = True) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail = fail
        self._real = engine.core.step
        engine.core.step = self.step

    def step(self):
        self.entered.set()
        self.release.wait(60)
        if self.fail:
            raise RuntimeError("injected step failure")
        return self._real()

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, LIVENESS), "no step started"


async def start_stream(engine, req):
    """Consume `req` in a task; returns the task (its result: the outputs, or the error)."""
    outs = []

    async def consume():
        async for out in engine.generate(req):
            outs.append(out)
        return outs

    return asyncio.create_task(consume())


# -- AsyncEngine ------------------------------------------------------------------------------


def test_loop_death_fails_pending_calls_streams_and_later_calls(tiny_llama):
    engine = make_engine(tiny_llama)
    deaths: list[BaseException] = []
    engine.on_death(deaths.append)
    gate = StepGate(engine)

    async def main():
        stream = await start_stream(engine, request("s1", max_tokens=1000))
        await gate.wait_entered()
        # Calls queued while the (doomed) step runs: they wait on the engine thread.
        calls = [
            asyncio.create_task(engine.kv_snapshot()),
            asyncio.create_task(engine.touch_export("nope")),
            asyncio.create_task(engine.release_export("nope")),
        ]
        await asyncio.sleep(0)  # let them queue their commands
        gate.release.set()
        done, pending = await asyncio.wait([stream, *calls], timeout=LIVENESS)
        assert not pending, "a waiter on the dead engine hangs"
        for task in done:
            assert isinstance(task.exception(), EngineDeadError), task.exception()
        # After the death: refused at once, without hanging.
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(engine.kv_snapshot(), LIVENESS)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(anext(engine.generate(request("s2"))), LIVENESS)

    try:
        asyncio.run(main())
        assert not engine.alive
        assert len(deaths) == 1 and "injected" in str(deaths[0])
        late: list[BaseException] = []
        engine.on_death(late.append)  # registered after the death: called at once
        assert len(late) == 1
    finally:
        engine.shutdown()


def test_calls_into_a_wedged_loop_time_out(tiny_llama):
    engine = make_engine(tiny_llama)
    gate = StepGate(engine, fail=False)
    engine.call_timeout = 0.2

    async def main():
        stream = await start_stream(engine, request("w1", max_tokens=4))
        await gate.wait_entered()
        with pytest.raises(TimeoutError, match="did not run"):
            await asyncio.wait_for(engine.kv_snapshot(), LIVENESS)
        gate.release.set()  # the step finishes: the engine carries on
        outs = await asyncio.wait_for(stream, LIVENESS)
        assert sum(len(o.token_ids) for o in outs) == 4
        engine.call_timeout = LIVENESS
        snap = await asyncio.wait_for(engine.kv_snapshot(), LIVENESS)
        assert snap.last_event_id >= 0

    try:
        asyncio.run(main())
        assert engine.alive
    finally:
        engine.shutdown()


def test_kv_event_buffer_is_bounded_and_a_gap_is_detected(tiny_llama, monkeypatch):
    monkeypatch.setattr(async_engine, "KV_EVENT_BUFFER", 8)
    engine = make_engine(tiny_llama, block_size=16)
    index = KvIndex()

    async def main():
        await asyncio.wait_for(drain(engine.generate(request("k0", 2))), LIVENESS)
        first = engine.take_kv_events()
        assert first and first[0].event_id == 0
        assert index.apply("w", first)  # a consumer that keeps up sees no gap
        # Nobody takes the events now (embedded mode): many requests, distinct prompts.
        for i in range(1, 30):
            req = request(f"k{i}", 2, first=1 + i)
            await asyncio.wait_for(drain(engine.generate(req)), LIVENESS)
            assert len(engine._kv_events) <= 8

    async def drain(stream):
        async for _ in stream:
            pass

    try:
        asyncio.run(main())
        assert engine.kv_events_dropped > 0
        kept = engine.take_kv_events()
        assert 0 < len(kept) <= 8
        ids = [e.event_id for e in kept]
        assert ids == list(range(ids[0], ids[0] + len(ids)))  # the newest, in order
        assert any(isinstance(e, KvStored) for e in kept)
        # The router's index sees the gap (it then fetches a snapshot of the worker).
        assert not index.apply("w", kept)
    finally:
        engine.shutdown()


# -- the worker -------------------------------------------------------------------------------


class OneWorker:
    """A worker (long lease: only its own revoke removes it quickly) and a RemoteEngine."""

    def __init__(self, engine, *, lease_ttl: float = 60.0, **remote_kw) -> None:
        self.discovery = MemoryDiscovery(default_ttl=lease_ttl)
        self.events = MemoryEventPlane()
        self.client = TcpRequestClient()
        self.worker = Worker(
            engine,
            model_card(engine, "tiny"),
            discovery=self.discovery,
            events=self.events,
            server=TcpRequestServer(),
            publish_interval=0.02,
        )
        self.remote = RemoteEngine(self.discovery, self.events, self.client, **remote_kw)

    async def __aenter__(self) -> OneWorker:
        await self.remote.start()
        await self.worker.start()
        await self.remote.wait_for_workers(1, timeout=LIVENESS)
        return self

    async def __aexit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            await self.worker.drain(0.5)
        await self.remote.close()
        await self.client.close()
        await self.discovery.close()


def test_worker_whose_engine_died_leaves_discovery_and_fails_its_streams(tiny_llama):
    engine = make_engine(tiny_llama)

    async def main():
        async with OneWorker(engine) as one:
            stream = one.remote.generate(request("d1", max_tokens=100000))
            await asyncio.wait_for(anext(stream), LIVENESS)
            gate = StepGate(engine)  # the engine dies mid-stream
            await gate.wait_entered()
            gate.release.set()

            async def rest():
                async for _ in stream:
                    pass

            with pytest.raises(WorkerLost):
                await asyncio.wait_for(rest(), LIVENESS)
            await asyncio.wait_for(one.worker.dead.wait(), LIVENESS)
            assert isinstance(one.worker.death, RuntimeError)
            # Gone from discovery at once, though its 60 s lease would still be valid.
            assert await one.discovery.list() == []
            async with asyncio.timeout(LIVENESS):
                while one.remote.describe():
                    await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


@needs_nats
def test_serve_worker_exits_non_zero_when_its_engine_dies(tiny_llama):
    from tandem.runtime.nats_discovery import NatsDiscovery
    from tandem.worker.service import serve_worker

    engine = make_engine(tiny_llama)

    async def main(url):
        watcher = await NatsDiscovery.connect(url)
        try:
            stop = asyncio.Event()
            served = asyncio.create_task(
                serve_worker(engine, model_card(engine, "tiny"), url, lease_ttl=60, stop=stop)
            )
            async with asyncio.timeout(LIVENESS):
                while not await watcher.list():
                    assert not served.done(), served
                    await asyncio.sleep(0.05)
            gate = StepGate(engine)
            gate.release.set()
            doomed = await start_stream(engine, request("boom"))  # its step fails
            status = await asyncio.wait_for(served, LIVENESS)
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(doomed, LIVENESS)
            assert status == 1
            assert await watcher.list() == []  # deregistered, not left to lapse
        finally:
            await watcher.close()

    try:
        with NatsServer() as nats:
            asyncio.run(main(nats.url))
    finally:
        engine.shutdown()


def test_first_output_deadline_and_dead_engine_refusal_is_retried(tiny_llama):
    engines = [make_engine(tiny_llama), make_engine(tiny_llama)]

    async def hangs(req):
        await asyncio.sleep(3600)
        yield None

    refused = []

    async def dead(req):
        refused.append(req.request_id)
        raise EngineDeadError("engine loop died: injected")
        yield None

    async def main():
        async with OneWorker(engines[0], first_output_timeout=0.3) as one:
            one.worker._server.endpoints["generate"] = one.worker._server.endpoints[
                "generate"
            ]._replace(handler=hangs)
            with pytest.raises(WorkerLost, match="did not start it"):
                await asyncio.wait_for(anext(one.remote.generate(request("h1"))), LIVENESS)
            # A second worker whose engine refuses as a dead one does: requests go elsewhere.
            other = Worker(
                engines[1],
                model_card(engines[1], "tiny"),
                discovery=one.discovery,
                events=one.events,
                server=TcpRequestServer(),
            )
            await other.start()
            await one.remote.wait_for_workers(2, timeout=LIVENESS)
            one.worker._server.endpoints["generate"] = one.worker._server.endpoints[
                "generate"
            ]._replace(handler=dead)
            one.remote.pool._suspect.clear()  # the hung worker was suspected: forget it
            for i in range(3):
                outs = [o async for o in one.remote.generate(request(f"r{i}", 4))]
                assert sum(len(o.token_ids) for o in outs) == 4
            assert refused, "the dead worker was never tried"
            await other.drain(0.5)

    try:
        asyncio.run(main())
    finally:
        for engine in engines:
            engine.shutdown()


# -- the supervisor ---------------------------------------------------------------------------


class FakeProc:
    def __init__(self) -> None:
        self.code: int | None = None
        self.pid = 0

    def poll(self) -> int | None:
        return self.code


def fake_cluster(tmp_path, monkeypatch, clock) -> tuple[supervisor.Supervisor, list[FakeProc]]:
    """A started supervisor of one mock worker and a frontend, its children FakeProcs (in
    the list returned, in spawn order)."""
    args = parse_args(["serve", str(tmp_path), "--workers", "1", "--engine", "mock"])
    workers, frontends = local_specs(args, tmp_path, "tiny", "cpu")("nats://x")
    cluster = supervisor.Supervisor(workers, frontends, clock=clock)
    spawned: list[FakeProc] = []

    def spawn(kind, spec):
        spawned.append(FakeProc())
        return spawned[-1]

    monkeypatch.setattr(cluster, "_spawn", spawn)
    cluster.start()
    return cluster, spawned


def test_supervisor_restarts_with_backoff_and_resets_the_budget(tmp_path, monkeypatch):
    now = [1000.0]
    cluster, spawned = fake_cluster(tmp_path, monkeypatch, lambda: now[0])
    assert len(spawned) == 2  # a worker and the frontend
    worker = spawned[0]

    def crash_and_wait(delay: float) -> None:
        """The current worker crashes; no restart before `delay` seconds, one after."""
        n = len(spawned)
        cluster.slots[0].proc.code = 1
        assert cluster.check() is None
        now[0] += delay - 0.01
        assert cluster.check() is None and len(spawned) == n, "restarted before its backoff"
        now[0] += 0.02
        assert cluster.check() is None and len(spawned) == n + 1
        assert cluster.slots[0].proc is spawned[-1]

    assert cluster.slots[0].proc is worker
    crash_and_wait(1.0)
    crash_and_wait(2.0)
    crash_and_wait(4.0)
    # A fourth crash in a row, without a healthy period: the budget is spent.
    cluster.slots[0].proc.code = 1
    assert cluster.check() == 1

    # Healthy for a minute between crashes: the budget starts over each time.
    cluster, spawned = fake_cluster(tmp_path, monkeypatch, lambda: now[0])
    for _ in range(2 * supervisor.MAX_RESTARTS):
        now[0] += supervisor.HEALTHY_SECONDS
        assert cluster.check() is None
        crash_and_wait(1.0)
    assert supervisor.Supervisor.backoff(20) == supervisor.MAX_BACKOFF


def test_a_worker_that_cannot_run_as_configured_is_not_restarted(tmp_path, monkeypatch):
    """Status 2 (an engine that refuses its settings, a bad spec): restarting would fail the
    same way, so the launcher stops at once instead of retrying for minutes."""
    cluster, spawned = fake_cluster(tmp_path, monkeypatch, lambda: 1000.0)
    cluster.slots[0].proc.code = supervisor.CONFIG_ERROR
    assert cluster.check() == 1 and len(spawned) == 2  # stopped, nothing respawned
