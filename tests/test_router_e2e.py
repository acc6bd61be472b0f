"""The router fed by real workers: KV events and snapshots from mock engines in this process,
then `tandem serve --workers 3 --router-mode kv` over a real nats-server, through `openai`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from nats_support import needs_nats

from tandem.deploy.processes import NatsServer, free_port
from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.engine.testing import make_tiny_model
from tandem.frontend.remote_engine import RemoteEngine
from tandem.protocol import GenerateRequest, SamplingParams
from tandem.runtime import MemoryDiscovery, MemoryEventPlane, TcpRequestClient, TcpRequestServer
from tandem.worker import Worker, model_card

BLOCK = 16


def request(rid: str, tokens: list[int]) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        prompt_token_ids=tokens,
        sampling=SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0),
    )


def prefix(user: int, blocks: int) -> list[int]:
    """Tokens of the tiny model's vocabulary (384), different for each user."""
    rng = random.Random(user)
    return [rng.randrange(2, 380) for _ in range(blocks * BLOCK)]


async def run(engine, req):
    return [out async for out in engine.generate(req)]


def test_pool_resyncs_from_a_snapshot_and_routes_to_the_cached_worker(tiny_llama):
    engines = [
        AsyncEngine(EngineConfig(model=str(tiny_llama), engine="mock", num_gpu_blocks=128))
        for _ in range(2)
    ]

    async def scenario() -> None:
        discovery = MemoryDiscovery(default_ttl=2.0)
        events = MemoryEventPlane()
        client = TcpRequestClient()
        workers = [
            Worker(
                e,
                model_card(e, "tiny"),
                discovery=discovery,
                events=events,
                server=TcpRequestServer(),
                publish_interval=0.02,
            )
            for e in engines
        ]
        for w in workers:
            await w.start()
        # Worker 0 fills its cache before any router listens: its events are gone.
        await run(engines[0], request("early", prefix(0, 6) + [1]))
        await asyncio.sleep(0.1)
        remote = RemoteEngine(discovery, events, client, policy="kv")
        await remote.start()
        await remote.wait_for_workers(2, timeout=5)
        router = remote.pool.router
        w0 = workers[0].instance_id
        try:
            # New events from worker 0 show the gap: the pool fetches a snapshot.
            await run(engines[0], request("late", prefix(5, 2) + [1]))
            async with asyncio.timeout(5):
                while not router.index.in_sync(w0):
                    await asyncio.sleep(0.02)
            cached = set(engines[0].core.block_manager.cached)
            assert remote.pool.snapshots == 1
            assert router.index.num_blocks(w0) == len(cached)
            # A prompt extending worker 0's cached prefix goes there and hits its cache.
            outs = [o async for o in remote.generate(request("r1", prefix(0, 6) + [7] * 40))]
            assert outs[0].num_cached_tokens == 6 * BLOCK
            assert {w["instance_id"]: w["requests"] for w in remote.describe()}[w0] == 1
        finally:
            for w in workers:
                with contextlib.suppress(Exception):
                    await w.drain(0.5)
            await remote.close()
            await client.close()
            await discovery.close()

    try:
        asyncio.run(scenario())
    finally:
        for e in engines:
            e.shutdown()


@needs_nats
def test_openai_sessions_through_kv_router_over_nats(tmp_path):
    """Three users, four turns each, three workers: every later turn finds its history cached
    because the router sends it where the earlier turns ran."""
    model = make_tiny_model(tmp_path / "tiny")
    port, router_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    log_path, router_log_path = tmp_path / "serve.log", tmp_path / "router.log"
    with NatsServer() as nats, open(log_path, "w") as log, open(router_log_path, "w") as router_log:
        router = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tandem.cli.main",
                "router",
                "--nats",
                nats.url,
                "--port",
                str(router_port),
            ],
            stdout=router_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # SIGABRT dumps every thread
        )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tandem.cli.main",
                "serve",
                str(model),
                "--engine",
                "mock",
                "--num-gpu-blocks",
                "512",
                "--workers",
                "3",
                "--nats",
                nats.url,
                "--port",
                str(port),
                "--router-mode",
                "kv",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 180
            while True:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                with contextlib.suppress(httpx.TransportError):
                    health = httpx.get(f"{base}/health", timeout=2)
                    if health.status_code == 200 and health.json()["workers"] == 3:
                        break
                time.sleep(0.3)
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
            histories = {user: prefix(user, 8) for user in range(3)}
            for turn in range(4):
                for user, history in histories.items():
                    reply = client.completions.create(
                        model="tiny", prompt=history, max_tokens=2, temperature=0
                    )
                    cached = reply.usage.prompt_tokens_details.cached_tokens
                    if turn:
                        # Everything but the last turn's partial block was cached.
                        assert cached >= (len(history) - 2 * BLOCK) // BLOCK * BLOCK, (user, turn)
                    history += prefix(100 * user + turn + 10, 1) + [3, 4, 5]
                time.sleep(0.3)  # let the workers' KV events reach the router
            workers = httpx.get(f"{base}/v1/workers", timeout=2).json()["data"]
            assert sum(w["indexed_blocks"] for w in workers) >= 3 * 8, workers
            metrics = httpx.get(f"{base}/metrics", timeout=2).text
            assert 'tandem_router_decisions_total{policy="kv"} 12.0' in metrics
            assert "tandem_router_decision_seconds_bucket" in metrics

            # The standalone router saw the same events: it knows where user 0's history is.
            query = {"token_ids": histories[0]}
            url = f"http://127.0.0.1:{router_port}"
            scores = httpx.post(f"{url}/overlap_scores", json=query, timeout=5).json()["scores"]
            best = httpx.post(f"{url}/best_worker", json=query, timeout=5).json()
            top = max(s["overlap_blocks"] for s in scores)
            assert top >= (len(histories[0]) - 2 * BLOCK) // BLOCK
            assert best["overlap_blocks"] == top and best["policy"] == "kv"
            assert best["address"] in {w["address"] for w in workers}
            bad = httpx.post(f"{url}/best_worker", json={"tokens": [1]}, timeout=5)
            assert bad.status_code == 400 and "tokens" in bad.json()["error"]["message"]
        finally:
            router.terminate()
            proc.terminate()
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
            try:
                router.wait(timeout=30)
            except subprocess.TimeoutExpired:
                router.send_signal(signal.SIGABRT)  # its threads' stacks go to the log
                try:
                    router.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    router.kill()
                pytest.fail("the router ignored SIGTERM for 30 s:\n" + router_log_path.read_text())
