"""`tandem serve --workers 2 --nats URL`: real processes (launcher, two mock-engine workers, a
frontend) on a real nats-server, driven by the official `openai` client.

One cluster serves the whole module, in order: answers through both workers; token streams
survive a NATS restart and discovery recovers; a worker SIGKILLed mid-stream loses no stream
(they migrate to the other worker, texts unchanged), leaves discovery within the lease TTL and
is restarted by the launcher; SIGTERM stops everything cleanly. A second cluster, without
migration, shows the victim's streams ending in an error, not a hang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from nats_support import needs_nats

from tandem.deploy.processes import NatsServer, free_port
from tandem.engine.testing import make_tiny_model
from tandem.protocol.worker import KV_SNAPSHOT_ENDPOINT, KvSnapshotRequest
from tandem.runtime import PeerGone, TcpRequestClient
from tandem.runtime.testing import child_pids

pytestmark = needs_nats

LEASE_TTL = 3.0  # the worker's default --lease-ttl
# Mock decode steps of about 57 ms (the polynomial's 5.7 ms at low load, slowed 10x): a stream of
# STREAM_TOKENS lasts about 3 s, long enough to act on the system while it runs.
SPEEDUP = "0.1"
STREAM_TOKENS = 50
SECRET = "test cluster secret"


class Cluster:
    def __init__(self, tmp: Path, *flags: str) -> None:
        self.nats = NatsServer().start()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "serve.log"
        model = make_tiny_model(tmp / "tiny")
        cmd = [
            sys.executable, "-m", "tandem.cli.main", "serve", str(model),
            "--engine", "mock", "--mock-speedup", SPEEDUP, "--num-gpu-blocks", "256",
            "--workers", "2", "--nats", self.nats.url, "--port", str(self.port),
            "--drain-timeout", "10", "--router-mode", "round_robin", *flags,
        ]  # fmt: skip
        env = {**os.environ, "TANDEM_CLUSTER_SECRET": SECRET}  # the children inherit it
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0)

    def log(self) -> str:
        return self.log_path.read_text()

    def health(self) -> dict | None:
        try:
            reply = httpx.get(f"{self.base}/health", timeout=2)
        except httpx.TransportError:
            return None
        return reply.json() if reply.status_code == 200 else None

    def wait_for_workers(self, n: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"tandem serve exited:\n{self.log()}"
            health = self.health()
            if health is not None and health["workers"] == n:
                return httpx.get(f"{self.base}/v1/workers", timeout=2).json()["data"]
            assert time.monotonic() < deadline, f"not {n} workers in {timeout} s:\n{self.log()}"
            time.sleep(0.2)

    def worker_pids(self) -> list[int]:
        return child_pids(self.proc, "worker")

    def stream(self, prompt: str) -> str:
        """One streamed completion of STREAM_TOKENS; its text."""
        chunks = self.client.completions.create(
            model="tiny", prompt=prompt, max_tokens=STREAM_TOKENS, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return "".join(c.choices[0].text for c in chunks if c.choices)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.nats.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    made = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        made.wait_for_workers(2, timeout=180)
        yield made
    finally:
        made.close()


def test_openai_client_through_two_workers(cluster):
    # /health counts the workers and names no address; /v1/workers has the details.
    assert cluster.health() == {"status": "ok", "workers": 2}
    details = cluster.wait_for_workers(2, timeout=5)
    assert all(w["address"].startswith("127.0.0.1:") for w in details), details
    models = [m.id for m in cluster.client.models.list()]
    assert models == ["tiny"]
    for _ in range(4):
        reply = cluster.client.completions.create(model="tiny", prompt="hello", max_tokens=4)
        assert reply.usage.completion_tokens == 4
    chat = cluster.client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in chat if c.usage is not None]
    assert usage and usage[-1].completion_tokens == 3
    # Round robin: each of the two workers served some of the five requests.
    served = sorted(w["requests"] for w in cluster.wait_for_workers(2, timeout=5))
    assert served[0] >= 2 and sum(served) == 5, served


def test_the_request_plane_refuses_a_client_without_the_secret(cluster):
    address = cluster.wait_for_workers(2, timeout=5)[0]["address"]

    async def snapshot(secret: str | None):
        client = TcpRequestClient(secret=secret)
        try:
            call = client.call(address, KV_SNAPSHOT_ENDPOINT, KvSnapshotRequest(), timeout=10)
            return [x async for x in call]
        finally:
            await client.close()

    os.environ.pop("TANDEM_CLUSTER_SECRET", None)
    with pytest.raises(PeerGone):
        asyncio.run(snapshot(None))
    with pytest.raises(PeerGone):
        asyncio.run(snapshot("a guess"))
    assert len(asyncio.run(snapshot(SECRET))) == 1


def test_streams_survive_a_nats_restart(cluster):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(cluster.stream, f"nats restart {i}") for i in range(4)]
        time.sleep(0.5)
        cluster.nats.stop()
        time.sleep(1.0)
        assert not any(s.done() for s in streams), "streams should still be running"
        cluster.nats.start()
        texts = [s.result(timeout=60) for s in streams]
    assert all(texts)
    # Discovery and the load events recover by themselves: both workers still serve.
    cluster.wait_for_workers(2, timeout=30)
    for _ in range(2):
        assert cluster.client.completions.create(model="tiny", prompt="x", max_tokens=2)


def streams_around_a_kill(cluster: Cluster, prompts: list[str]) -> list[str | Exception]:
    """Stream every prompt at once and SIGKILL one worker a second in; each outcome."""
    victim = cluster.worker_pids()[0]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        streams = [pool.submit(cluster.stream, p) for p in prompts]
        time.sleep(1.0)
        assert not any(s.done() for s in streams), "streams should still be running"
        os.kill(victim, signal.SIGKILL)
        outcomes: list[str | Exception] = []
        for s in streams:
            try:
                outcomes.append(s.result(timeout=60))  # never a hang
            except openai.APIError as exc:
                outcomes.append(exc)
    return outcomes


def test_sigkilled_worker_loses_no_stream_and_is_replaced(cluster):
    """Migration (on by default): the victim's streams go on on the other worker with the
    tokens they had; every text equals the one of a run without the kill."""
    prompts = [f"kill {i}" for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        expected = list(pool.map(cluster.stream, prompts))
    survivor = cluster.worker_pids()[1]
    outcomes = streams_around_a_kill(cluster, prompts)
    assert outcomes == expected
    metrics = httpx.get(f"{cluster.base}/metrics", timeout=5).text
    # Round robin put three streams on each worker: the victim's three migrated.
    assert "tandem_migrations_total 3.0" in metrics, metrics
    # Gone from discovery within the lease TTL (plus the watch's delivery).
    start = time.monotonic()
    cluster.wait_for_workers(1, timeout=LEASE_TTL + 3)
    assert time.monotonic() - start <= LEASE_TTL + 3
    restarted = r"worker [0-9a-f]{16} \(aggregated\) exited with status -9; restarting it"
    assert re.search(restarted, cluster.log()), cluster.log()
    cluster.wait_for_workers(2, timeout=120)
    assert survivor in cluster.worker_pids()


def test_without_migration_the_lost_streams_end_in_a_clear_error(tmp_path):
    no_migration = Cluster(tmp_path, "--migration-limit", "0")
    try:
        no_migration.wait_for_workers(2, timeout=180)
        outcomes = streams_around_a_kill(no_migration, [f"lost {i}" for i in range(6)])
    finally:
        no_migration.close()
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert len(failed) == 3, outcomes
    assert all("died mid-stream" in str(e) for e in failed), failed
    assert all(isinstance(o, str) and o for o in outcomes if o not in failed)


def test_sigterm_stops_everything(cluster):
    children = cluster.worker_pids()
    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.proc.wait(timeout=40) == 0, cluster.log()
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    assert cluster.nats.proc.poll() is None  # an external NATS is not ours to stop


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
