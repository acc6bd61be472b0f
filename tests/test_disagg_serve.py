"""`tandem serve MODEL --prefill-workers 1 --decode-workers 1`: launcher, a prefill worker, a
decode worker and a frontend as real processes on a real nats-server, driven by `openai`.

Each prompt is sent twice. The first time the decode worker holds none of it, so it is
prefilled on the prefill worker and its KV moves over host/TCP or NIXL (`--kv-transport`);
the second time the decode
worker holds the prompt (the imported blocks entered its prefix cache), so it is prefilled
there, as in aggregated serving. Both answers must be the same text. On a GPU machine the same
runs with `--device cuda`, where the KV moves through CUDA IPC between the two processes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from nats_support import needs_nats

from tandem.deploy.processes import NatsServer, free_port
from tandem.engine.testing import make_tiny_model
from tandem.transfer.nixl import nixl_api

pytestmark = needs_nats

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Prefill is compute bound; decode is memory bound. Tokens stream to many users. " * 4,
]


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


CASES = [
    ("cpu", "tcp"),
    ("cpu", "nixl"),  # CI installs NIXL with the test extras: there the worker must start
    pytest.param(
        "cuda",
        "auto",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ),
]


@pytest.mark.parametrize(("device", "kv_transport"), CASES)
def test_openai_against_prefill_and_decode_workers(tmp_path, device, kv_transport):
    if kv_transport == "nixl" and nixl_api() is None and os.environ.get("CI") != "true":
        pytest.skip("NIXL not installed (pip install -e '.[test]' brings nixl-cu12)")
    model = make_tiny_model(tmp_path / "tiny")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with NatsServer() as nats, open(log_path, "w") as log:
        cmd = [
            sys.executable, "-m", "tandem.cli.main", "serve", str(model),
            "--prefill-workers", "1", "--decode-workers", "1", "--nats", nats.url,
            "--port", str(port), "--num-gpu-blocks", "256", "--max-local-prefill-length", "16",
            "--drain-timeout", "5", "--device", device, "--kv-transport", kv_transport,
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while "serving 'tiny'" not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
            assert "1 worker(s) and 1 prefill worker(s)" in log_path.read_text()
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
            roles = {w["role"] for w in httpx.get(f"{base}/v1/workers").json()["data"]}
            assert roles == {"prefill", "decode"}
            for prompt in PROMPTS:
                answers = []
                for _ in range(2):
                    stream = client.completions.create(
                        model="tiny",
                        prompt=prompt,
                        max_tokens=24,
                        temperature=0,
                        stream=True,
                        extra_body={"ignore_eos": True},
                    )
                    answers.append("".join(chunk.choices[0].text for chunk in stream))
                    time.sleep(0.5)  # the decode worker's KV events reach the router
                assert answers[0] == answers[1] and answers[0]
            chat = client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": PROMPTS[0] * 2}],
                max_tokens=8,
                temperature=0,
            )
            assert chat.usage.completion_tokens == 8 or chat.choices[0].finish_reason == "stop"
            # The workers' counters reach the frontend with their periodic load reports.
            deadline = time.monotonic() + 10
            metrics = httpx.get(f"{base}/metrics").text
            while metric(metrics, "tandem_kv_imports_total") < 3 and time.monotonic() < deadline:
                time.sleep(0.2)
                metrics = httpx.get(f"{base}/metrics").text
            assert metric(metrics, 'tandem_disagg_requests_total{path="remote"}') == 3
            assert metric(metrics, 'tandem_disagg_requests_total{path="local_short"}') == 2
            assert metric(metrics, "tandem_kv_imports_total") == 3
            assert metric(metrics, "tandem_kv_import_fallbacks_total") == 0
            log_text = log_path.read_text()
            if device == "cuda":
                assert "through CUDA IPC" in log_text
            nixl_read = "reading KV blocks through NIXL" in log_text
            assert nixl_read == (kv_transport == "nixl"), log_text
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log_path.read_text()
