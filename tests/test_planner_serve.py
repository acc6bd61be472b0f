"""`tandem serve --planner`: the SLA planner beside the local supervisor, on real processes
(mock-engine workers, a frontend, a nats-server), driven by the official `openai` client.

The planner learns each pool's steps from the workers' reports, grows both pools when the
targets are missed, reports its decisions as metrics on the frontend; the supervisor's pools
shrink by draining, with no request lost."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from nats_support import needs_nats

from tandem.cli import main as cli
from tandem.cli.planner import new_planner, planner_config
from tandem.cli.serve import local_specs
from tandem.deploy.planning import ProcessScaler
from tandem.deploy.processes import NatsServer, free_port
from tandem.deploy.supervisor import Supervisor
from tandem.engine.testing import make_tiny_model
from tandem.protocol.worker import GENERATE_ENDPOINT, WORKER_COMPONENT
from tandem.runtime import MemoryDiscovery
from tandem.runtime.messages import InstanceInfo

TOKENS = 12


def test_planner_flags_are_checked_before_anything_starts(tmp_path, capsys):
    def error(*flags: str) -> str:
        code = cli.main(["serve", str(tmp_path), "--engine", "mock", *flags])
        assert code == 2
        return capsys.readouterr().err

    assert "--ttft-slo, --planner-interval need --planner" in error(
        "--ttft-slo", "0.2", "--planner-interval", "5"
    )
    assert "with --workers, the bound is --max-gpu-budget" in error(
        "--planner", "--workers", "2", "--max-decode-workers", "3"
    )
    assert "--workers 20 is above --max-gpu-budget 16" in error("--planner", "--workers", "20")
    assert "--decode-workers 3 is above --max-decode-workers 2" in error(
        "--planner", "--prefill-workers", "1", "--decode-workers", "3",
        "--max-decode-workers", "2",
    )  # fmt: skip
    assert "above --max-gpu-budget 2" in error(
        "--planner", "--prefill-workers", "1", "--decode-workers", "2", "--max-gpu-budget", "2"
    )
    assert "cannot read performance profile" in error(
        "--planner", "--prefill-workers", "1", "--decode-workers", "1",
        "--planner-profile", str(tmp_path / "missing.json"),
    )  # fmt: skip
    args = cli.parse_args(["serve", "--planner", "--prefill-workers", "1", "--decode-workers",
                           "2", "--planner-interval", "4", "--worker-startup", "9"])  # fmt: skip
    config = planner_config(args)
    assert (config.ttft_s, config.itl_s, config.lead_intervals) == (0.5, 0.05, 3)
    assert (config.prefill.max_replicas, config.decode.max_replicas) == (8, 8)
    assert new_planner(args, config).model.prefill_s(100) is None  # learns from the workers
    profile = tmp_path / "profile.json"
    steps = {"prefill": [[128, 20.0], [512, 60.0], [2048, 250.0]],
             "decode": [[1, 256, 8.0], [8, 256, 9.0], [32, 256, 12.0]]}  # fmt: skip
    profile.write_text(json.dumps(steps))
    args.planner_profile = str(profile)
    seeded = new_planner(args, config)  # decides from the first interval
    assert seeded.model.prefill_s(512) == pytest.approx(0.060, rel=0.1)
    assert seeded.decode_model.decode_s(8, 8 * 256) == pytest.approx(0.009, rel=0.1)


def completions(client: openai.OpenAI, n: int) -> list[int]:
    """`n` concurrent requests; the tokens each got."""

    def one(i: int) -> int:
        reply = client.completions.create(
            model="tiny", prompt=[1 + i % 50] * (40 + 16 * (i % 5)), max_tokens=TOKENS,
            temperature=0, extra_body={"ignore_eos": True},
        )  # fmt: skip
        return reply.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def metric(text: str, name: str, labels: str) -> float | None:
    found = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


SPLIT = ["--prefill-workers", "1", "--decode-workers", "1", "--max-prefill-workers", "2",
         "--max-decode-workers", "2", "--max-local-prefill-length", "0"]  # fmt: skip
AGGREGATED = ["--workers", "1", "--max-gpu-budget", "2"]


@needs_nats
@pytest.mark.parametrize(("pools", "grown"), [(SPLIT, [2.0, 2.0, None]),
                                             (AGGREGATED, [None, None, 2.0])],
                         ids=["split", "aggregated"])  # fmt: skip
def test_serve_with_the_planner_grows_its_pools_and_loses_no_request(
    tmp_path: Path, pools: list[str], grown: list
):
    """Split pools grow both; an aggregated pool grows as one."""
    model = make_tiny_model(tmp_path / "tiny")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with NatsServer() as nats, open(log_path, "w") as log:
        # Targets no worker can meet: once its step models are trained, the planner grows
        # both pools to their bounds.
        proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli.main", "serve", str(model), "--engine", "mock",
             "--mock-speedup", "10", "--num-gpu-blocks", "512", "--nats", nats.url,
             "--port", str(port), *pools, "--planner", "--ttft-slo", "0.0001",
             "--itl-slo", "0.0001", "--planner-interval", "1", "--worker-startup", "1"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        # Retries: a 503 from admission (its in-flight limit adapts to the TTFT it sees) is
        # a refusal, not a loss.
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=5)
        try:
            deadline = time.monotonic() + 120
            served: list[int] = []
            while True:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                try:
                    health = httpx.get(f"{base}/health", timeout=2).json()
                    metrics = httpx.get(f"{base}/metrics", timeout=2).text
                except httpx.TransportError:
                    time.sleep(0.3)
                    continue
                sizes = [metric(metrics, "tandem_planner_replicas", f'pool="{pool}"')
                         for pool in ("prefill", "decode", "aggregated")]  # fmt: skip
                if sizes == grown and health.get("workers") == sum(filter(None, grown)):
                    break
                for wave in (3, 6, 9):  # steps of three sizes: the step models can fit
                    served += completions(client, wave)
            served += completions(client, 8)  # on the grown pools
            assert served == [TOKENS] * len(served), "a request lost tokens"
            assert metric(metrics, "tandem_planner_request_rate", 'kind="observed"') is not None
            for role in ("prefill", "decode") if pools is SPLIT else ("aggregated",):
                assert f"{role} workers: 1 -> 2" in log_path.read_text()
            workers = httpx.get(f"{base}/v1/workers", timeout=2).json()["data"]
            assert len({w["address"] for w in workers}) == sum(filter(None, grown))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail("tandem serve ignored SIGTERM:\n" + log_path.read_text())
        assert code == 0, log_path.read_text()


class FakeSupervisor:
    """Sizes and ids as the supervisor reports them."""

    def __init__(self, ids: dict[str, list[str]]) -> None:
        self.ids, self.wanted = ids, {}

    def size(self, role: str) -> int:
        return self.wanted.get(role, len(self.ids[role]))

    def instance_ids(self, role: str) -> list[str]:
        return self.ids[role]

    def want(self, role: str, n: int) -> None:
        self.wanted[role] = n


def test_the_process_scaler_counts_workers_not_in_discovery_as_starting():
    supervisor = FakeSupervisor({"prefill": ["p1"], "decode": ["d1", "d2"]})
    scaler = ProcessScaler(supervisor)
    scaler.serving = {"p1", "d1"}
    assert scaler.replicas() == (1, 2) and scaler.starting() == (0, 1)
    asyncio.run(scaler.scale(2, 2))
    assert scaler.replicas() == (2, 2) and scaler.starting() == (1, 1)


@needs_nats
def test_the_supervisor_grows_a_pool_and_drains_what_it_no_longer_wants(tmp_path: Path, capfd):
    """Real worker processes: a pool grows by a copy of its first worker, and shrinks by
    draining one worker while streams run on it; every stream completes."""
    model = make_tiny_model(tmp_path / "tiny")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = cli.parse_args(["serve", str(model), "--engine", "mock", "--mock-speedup", "0.1",
                           "--prefill-workers", "1", "--decode-workers", "1", "--port",
                           str(port), "--router-mode", "round_robin",
                           "--max-local-prefill-length", "1000"])  # fmt: skip
    with NatsServer() as nats:
        workers, frontends = local_specs(args, model, "tiny", "cpu")(nats.url)
        supervisor = Supervisor(workers, frontends, drain_timeout=20.0)
        stop = threading.Event()

        def supervise() -> None:
            while not stop.is_set():
                assert supervisor.check() is None
                time.sleep(0.1)

        supervisor.start()
        watcher = threading.Thread(target=supervise)
        watcher.start()
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        try:
            supervisor.want("decode", 2)
            assert supervisor.size("decode") == 2
            wait_for(lambda: health(base).get("workers") == 3, "three workers serve")
            grown = supervisor.instance_ids("decode")
            assert len(set(grown)) == 2 and supervisor.instance_ids("prefill") != grown[:1]

            def stream(i: int) -> int:
                chunks = client.completions.create(
                    model="tiny", prompt=f"story {i}", max_tokens=30, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                )  # fmt: skip
                return [c.usage.completion_tokens for c in chunks if c.usage][-1]

            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                streams = [pool.submit(stream, i) for i in range(6)]
                time.sleep(1.0)  # streams run on both decode workers
                supervisor.want("decode", 1)
                assert supervisor.size("decode") == 1
                tokens = [s.result(timeout=120) for s in streams]
            assert tokens == [30] * 6, "a stream lost tokens while its worker drained"
            wait_for(lambda: len(supervisor.slots) == 2, "the drained worker is gone")
            assert supervisor.instance_ids("decode") == grown[:1]
            wait_for(lambda: health(base).get("workers") == 2, "two workers serve")
            # The children's logs: the retired worker had streams to finish.
            assert re.search(r"draining [1-9]\d* in-flight", capfd.readouterr().err)
        finally:
            stop.set()
            watcher.join()
            supervisor.stop()


def health(base: str) -> dict:
    try:
        return httpx.get(f"{base}/health", timeout=2).json()
    except (httpx.TransportError, ValueError):
        return {}


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.2)


@needs_nats
def test_tandem_planner_with_the_local_connector_supervises_its_workers(tmp_path: Path):
    """Standalone: its workers join NATS discovery (a frontend started apart would find
    them), the planner reports; SIGTERM drains and stops them."""
    model = make_tiny_model(tmp_path / "tiny")
    log_path = tmp_path / "planner.log"
    with NatsServer() as nats, open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli.main", "planner", "--nats", nats.url, str(model),
             "--engine", "mock", "--prefill-workers", "1", "--decode-workers", "2",
             "--planner-interval", "0.5"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for(lambda: log_path.read_text().count(" ready at ") == 3, "three workers")
            assert "started 1 prefill worker(s), 2 decode worker(s) and 0 frontend(s)" in (
                log_path.read_text()
            )
            assert "planner: every 0.5 s" in log_path.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
        assert code == 0, log_path.read_text()


class IdleProc:
    pid = 0

    def poll(self) -> None:
        return None


def test_the_process_scaler_measures_how_long_its_workers_take_to_serve(tmp_path, monkeypatch):
    """From the spawn to the worker's first appearance in discovery, once per start; the
    planner then sizes for the load that far ahead."""
    args = cli.parse_args(["serve", str(tmp_path), "--engine", "mock", "--prefill-workers", "1",
                           "--decode-workers", "1"])  # fmt: skip
    workers, _ = local_specs(args, tmp_path, "tiny", "cpu")("nats://127.0.0.1:1")
    now = [100.0]
    supervisor = Supervisor(workers, [], clock=lambda: now[0])
    monkeypatch.setattr(supervisor, "_spawn", lambda kind, spec: IdleProc())
    supervisor.start()
    scaler = ProcessScaler(supervisor)
    decode = supervisor.instance_ids("decode")[0]

    def card(metadata: dict) -> InstanceInfo:
        return InstanceInfo(namespace="tandem", component=WORKER_COMPONENT,
                            endpoint=GENERATE_ENDPOINT, instance_id=decode,
                            address="127.0.0.1:1", metadata=metadata)  # fmt: skip

    async def main() -> None:
        discovery = MemoryDiscovery()
        follow = asyncio.ensure_future(scaler.follow(discovery, "tandem"))
        await asyncio.sleep(0.01)
        assert scaler.measured_startup() is None and scaler.starting() == (1, 1)
        now[0] += 42.0  # loading the model...
        await discovery.register(card({}))
        await asyncio.sleep(0.05)
        now[0] += 10.0
        await discovery.register(card({"changed": True}))  # a new card is no new start
        await asyncio.sleep(0.05)
        follow.cancel()
        await discovery.close()

    asyncio.run(main())
    assert list(scaler.startups) == [42.0] and scaler.measured_startup() == 42.0
    assert scaler.starting() == (1, 0)
    planner = new_planner(cli.parse_args(["serve", "--planner", "--workers", "2"]),
                          planner_config(cli.parse_args(["serve", "--planner"])))  # fmt: skip
    planner.plan_ahead(scaler.measured_startup(), 10.0)
    assert planner.config.lead_intervals == 5
