"""Embedded `tandem serve` runs the cluster's components in one process: a worker over the
engine, publishing KV events, and the frontend's KV router consuming them."""

from __future__ import annotations

import contextlib
import random
import re
import subprocess
import sys
import time

import httpx
import openai

from tandem.deploy.processes import free_port
from tandem.engine.testing import make_tiny_model

BLOCK = 16


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def test_embedded_serve_routes_by_the_workers_kv_events(tmp_path):
    model = make_tiny_model(tmp_path / "tiny")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "tandem.cli.main", "serve", str(model), "--engine", "mock",
           "--num-gpu-blocks", "256", "--port", str(port)]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        rng = random.Random(0)
        history = [rng.randrange(2, 380) for _ in range(6 * BLOCK)]
        for _ in range(3):
            reply = client.completions.create(
                model="tiny", prompt=history, max_tokens=2, temperature=0
            )
            assert reply.choices[0].finish_reason == "length"
            history += [rng.randrange(2, 380) for _ in range(BLOCK)]
            time.sleep(0.3)  # the worker publishes KV events every 50 ms
        workers = httpx.get(f"{base}/v1/workers", timeout=2).json()["data"]
        assert len(workers) == 1 and workers[0]["indexed_blocks"] >= 6, workers
        text = httpx.get(f"{base}/metrics", timeout=2).text
        assert metric(text, 'tandem_router_decisions_total{policy="kv"}') == 3
        # Turns 2 and 3 found their history in the index the events built.
        assert metric(text, "tandem_router_overlap_blocks_total") >= 6 + 7
    finally:
        proc.terminate()
        try:
            # uvicorn re-raises SIGTERM once it has shut down gracefully
            assert proc.wait(timeout=30) in (0, -15), log_path.read_text()
            tail = log_path.read_text().split("Shutting down")[-1]
            assert re.search(r"worker \w+ stopped", tail), tail  # the worker drained
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
