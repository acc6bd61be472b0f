"""`tandem worker` and `tandem frontend`: the two halves of distributed mode, each its own
process, finding each other through NATS (DESIGN.md, running modes).

`tandem serve --workers N` starts them for you on one machine (`tandem.deploy.supervisor`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

from tandem.cli import main as cli
from tandem.http.server import bind_or_report, url_host
from tandem.runtime.nats_client import NATS_ENV

log = logging.getLogger("tandem")

ROLES = ("aggregated", "prefill", "decode")


def _port_or_zero(text: str) -> int:
    return 0 if text == "0" else cli._port(text)


def _add_runtime_flags(p: argparse.ArgumentParser, nats_required: bool = True) -> None:
    rt = p.add_argument_group("distributed runtime")
    rt.add_argument(
        "--nats",
        metavar="URL",
        required=nats_required,
        help="NATS server for discovery and events, e.g. nats://127.0.0.1:4222",
    )
    rt.add_argument(
        "--namespace",
        default="tandem",
        help="discovery namespace; frontends use the workers of their namespace (%(default)s)",
    )
    rt.add_argument(
        "--cluster-secret",
        metavar="SECRET",
        help="secret every component presents on the request plane and KV transfer; peers"
        " without it are refused. Prefer the TANDEM_CLUSTER_SECRET environment variable"
        " (a command line is visible to other users); it is the default",
    )
    what = {"cert": "this component's certificate", "key": "its private key",
            "ca": "the cluster's CA certificate"}  # fmt: skip
    for flag, env in (("cert", "TANDEM_TLS_CERT"), ("key", "TANDEM_TLS_KEY"),
                      ("ca", "TANDEM_TLS_CA")):  # fmt: skip
        rt.add_argument(
            f"--tls-{flag}",
            metavar="PEM",
            help=f"mutual TLS on the request plane: {what[flag]}"
            f" (default ${env}); all three together",
        )


    what = {"creds": "a credentials file (JWT and NKey seed)", "tls-ca": "the CA that signed"
            " the NATS server's certificate", "tls-cert": "this component's certificate",
            "tls-key": "its private key"}  # fmt: skip
    more = {"creds": "; a token, user or password come from $TANDEM_NATS_TOKEN, _USER,"
            " _PASSWORD or the URL"}  # fmt: skip
    for flag, env in (("creds", "creds"), ("tls-ca", "ca"), ("tls-cert", "cert"),
                      ("tls-key", "key")):  # fmt: skip
        rt.add_argument(
            f"--nats-{flag}",
            metavar="FILE",
            help=f"NATS: {what[flag]} (default ${NATS_ENV[env]})" + more.get(flag, ""),
        )


def _use_cluster_secret(args: argparse.Namespace) -> None:
    """The request plane and NATS read the secret, credentials and TLS files from the
    environment, so children inherit them."""
    from tandem.runtime.framing import SECRET_ENV, TLS_ENV

    if args.cluster_secret:
        os.environ[SECRET_ENV] = args.cluster_secret
    for value, env in zip((args.tls_cert, args.tls_key, args.tls_ca), TLS_ENV, strict=True):
        if value:
            os.environ[env] = value
    nats_files = (args.nats_creds, args.nats_tls_ca, args.nats_tls_cert, args.nats_tls_key)
    for value, name in zip(nats_files, ("creds", "ca", "cert", "key"), strict=True):
        if value:
            os.environ[NATS_ENV[name]] = value


def add_router_flags(p: argparse.ArgumentParser) -> None:
    """How a frontend (or `tandem router`) picks workers; names as in NVIDIA Dynamo."""
    from tandem.router import POLICIES

    r = p.add_argument_group("routing")
    r.add_argument(
        "--router-mode",
        choices=POLICIES,
        default="kv",
        help="kv: the worker holding most of the prompt's KV blocks, balanced against load;"
        " or round_robin, random, least_loaded (%(default)s)",
    )
    r.add_argument(
        "--kv-overlap-score-weight",
        type=cli._non_negative_float,
        default=1.0,
        help="kv: credit per cached block against one block of load (%(default)s)",
    )
    r.add_argument(
        "--kv-decode-weight",
        type=cli._non_negative_float,
        default=1.0,
        help="kv: weight of a worker's active decode blocks against queued prefill blocks"
        " (%(default)s)",
    )
    r.add_argument(
        "--router-temperature",
        type=cli._non_negative_float,
        default=0.0,
        help="kv: 0 takes the lowest cost; above 0 samples by softmax of -cost (%(default)s)",
    )
    r.add_argument(
        "--no-kv-events",
        action="store_true",
        help="kv: the workers publish no KV events; predict their blocks from routing decisions",
    )
    r.add_argument(
        "--router-ttl",
        type=cli._positive_float,
        default=120.0,
        help="with --no-kv-events: seconds a predicted block is trusted (%(default)s)",
    )


def add_frontend_flags(p: argparse.ArgumentParser) -> None:
    """A frontend's handling of lost workers and of disaggregated requests (Dynamo's names)."""
    from tandem.frontend.remote_engine import MIGRATION_LIMIT

    f = p.add_argument_group("worker failures")
    f.add_argument(
        "--migration-limit",
        type=cli._int_at_least(0),
        default=MIGRATION_LIMIT,
        help="times a request moves to another worker, with the tokens streamed so far, when"
        " its worker dies or fails mid-stream; 0: the client gets an error (%(default)s)",
    )
    d = p.add_argument_group("disaggregated serving (when prefill workers are live)")
    d.add_argument(
        "--max-local-prefill-length",
        type=cli._int_at_least(0),
        default=512,
        help="prefill on the decode worker when at most this many prompt tokens are uncached"
        " there (%(default)s)",
    )
    d.add_argument(
        "--max-prefill-queue-tokens",
        type=cli._int_at_least(1),
        default=16384,
        help="a prefill worker with this many prompt tokens queued is saturated; when all are,"
        " decode workers with room prefill locally (%(default)s)",
    )


def disagg_config(args: argparse.Namespace) -> Any:
    from tandem.frontend.disagg import DisaggConfig

    return DisaggConfig(
        max_local_prefill_length=args.max_local_prefill_length,
        max_prefill_queue_tokens=args.max_prefill_queue_tokens,
    )


def router_options(args: argparse.Namespace) -> dict[str, Any]:
    """`Router` keyword arguments from `add_router_flags` flags."""
    return {
        "credit": args.kv_overlap_score_weight,
        "decode_weight": args.kv_decode_weight,
        "temperature": args.router_temperature,
        "approx_ttl": args.router_ttl if args.no_kv_events else None,
    }


# -- tandem worker ------------------------------------------------------------------------


def add_worker(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "worker",
        help="run an engine as a worker that frontends find over NATS",
        description=(
            "Load MODEL into an engine, serve its `generate` endpoint over TCP, register it"
            " with its model card in NATS discovery and publish its KV events and load."
            " SIGTERM or Ctrl-C drains it: it deregisters, finishes its in-flight requests"
            " (up to --drain-timeout), then exits."
        ),
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="as for `tandem serve`")
    _add_runtime_flags(p)
    w = p.add_argument_group("worker")
    w.add_argument("--role", choices=ROLES, default="aggregated", help="(%(default)s)")
    w.add_argument("--host", default="127.0.0.1", help="address of the request plane (%(default)s)")
    w.add_argument(
        "--port", type=_port_or_zero, default=0, help="request plane port; 0 picks one (0)"
    )
    w.add_argument(
        "--insecure",
        action="store_true",
        help="let the request plane listen beyond 127.0.0.1 without a cluster secret",
    )
    w.add_argument(
        "--advertise-host",
        help="host that frontends connect to, when --host is a wildcard such as 0.0.0.0",
    )
    w.add_argument(
        "--served-model-name",
        help="model name in the card, as clients send it (default: the folder or file name)",
    )
    w.add_argument(
        "--lease-ttl",
        type=cli._positive_float,
        default=3.0,
        help="seconds after which a dead worker leaves discovery (%(default)s)",
    )
    w.add_argument(
        "--drain-timeout",
        type=cli._positive_float,
        default=30.0,
        help="on SIGTERM, seconds allowed for in-flight requests to finish (%(default)s)",
    )
    w.add_argument(
        "--log-level", choices=cli.LOG_LEVELS, default="info", help="log verbosity (%(default)s)"
    )
    cli._add_engine_flags(p)
    cli._add_mock_flags(p)
    p.set_defaults(run=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    _use_cluster_secret(args)
    from tandem.deploy.child import run_worker as run
    from tandem.deploy.specs import WorkerSpec
    from tandem.engine.model_source import (
        ModelSourceError,
        default_served_model_name,
        resolve_model,
    )

    device = args.device or cli._default_device()
    try:
        model_path = resolve_model(
            args.model, need_weights=args.engine == "real" and args.load_format == "auto"
        )
    except ModelSourceError as exc:
        print(f"tandem worker: error: {exc}", file=sys.stderr)
        return 2
    spec = WorkerSpec(
        engine=cli.engine_config(args, model_path, device),
        served=args.served_model_name or default_served_model_name(args.model),
        nats=args.nats,
        role=args.role,
        host=args.host,
        port=args.port,
        advertise_host=args.advertise_host,
        insecure=args.insecure,
        namespace=args.namespace,
        lease_ttl=args.lease_ttl,
        drain_timeout=args.drain_timeout,
        log_level=args.log_level,
    )
    return run(spec)  # 1: the engine died (the worker left discovery); the supervisor restarts it


# -- tandem frontend ----------------------------------------------------------------------


def add_frontend(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "frontend",
        help="serve the OpenAI API in front of the workers found over NATS",
        description=(
            "Serve an OpenAI-compatible HTTP API and send requests to the workers registered"
            " in NATS discovery, chosen by --router-mode. Waits for --min-workers workers;"
            " the first worker's model card gives the model name, tokenizer and context length."
        ),
    )
    _add_runtime_flags(p)
    net = _add_listen_flags(p, port=8000)
    net.add_argument(
        "--served-model-name", help="model name clients send (default: the workers' card)"
    )
    net.add_argument(
        "--tokenizer",
        help="tokenizer folder (default: the path in the workers' model card, which must then"
        " exist on this machine)",
    )
    net.add_argument(
        "--api-key",
        default=os.environ.get("TANDEM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 calls (default: $TANDEM_API_KEY)",
    )
    net.add_argument(
        "--max-waiting",
        type=cli._int_at_least(1),
        default=256,
        help="requests that may wait in the workers' queues before 503 (%(default)s)",
    )
    net.add_argument(
        "--max-client-rate",
        type=cli._non_negative_float,
        default=0.0,
        help="generation requests a second one client address may send; beyond, 429 with"
        " Retry-After (0: no limit)",
    )
    net.add_argument(
        "--max-request-bytes",
        type=cli._int_at_least(1),
        default=8 * 2**20,
        help="largest request body; a larger one gets 413 before it is parsed (%(default)s)",
    )
    net.add_argument(
        "--min-workers",
        type=cli._int_at_least(1),
        default=1,
        help="decode (or aggregated) workers to wait for before serving (%(default)s)",
    )
    net.add_argument(
        "--min-prefill-workers",
        type=cli._int_at_least(0),
        default=0,
        help="prefill workers to wait for before serving (%(default)s)",
    )
    net.add_argument(
        "--log-level", choices=cli.LOG_LEVELS, default="info", help="log verbosity (%(default)s)"
    )
    add_router_flags(p)
    add_frontend_flags(p)
    p.set_defaults(run=run_frontend)


def run_frontend(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    _use_cluster_secret(args)
    from tandem.deploy.child import run_frontend as run

    return run(frontend_spec(args, args.nats))


def frontend_spec(args: argparse.Namespace, nats: str, **overrides: Any) -> Any:
    """The FrontendSpec of the frontend and router flags in `args` (`tandem frontend`'s, or
    `tandem serve`'s for the frontend it starts), with `overrides`."""
    from tandem.deploy.specs import FrontendSpec

    fields = dict(
        nats=nats,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_waiting=args.max_waiting,
        max_request_bytes=args.max_request_bytes,
        max_client_rate=args.max_client_rate,
        log_level=args.log_level,
        policy=args.router_mode,
        router_options=router_options(args),
        disagg=disagg_config(args),
        migration_limit=args.migration_limit,
    )
    for name in ("namespace", "served_model_name", "tokenizer", "min_workers",
                 "min_prefill_workers"):  # fmt: skip
        if hasattr(args, name):
            fields["served" if name == "served_model_name" else name] = getattr(args, name)
    return FrontendSpec(**{**fields, **overrides})


def local_specs(args: argparse.Namespace, model_path: Any, served: str, device: str) -> Any:
    """For `tandem serve --workers N` (or P prefill + D decode workers): a function of the NATS
    URL giving the worker specs and the frontend spec that the supervisor starts."""
    from tandem.deploy.specs import WorkerSpec

    if args.prefill_workers:
        roles = ["prefill"] * args.prefill_workers + ["decode"] * args.decode_workers
    else:
        roles = ["aggregated"] * args.workers
    engine = cli.engine_config(args, model_path, device)

    def specs_for(nats: str) -> tuple[list[Any], Any]:
        workers = [
            WorkerSpec(engine=engine, served=served, nats=nats, role=role,
                       drain_timeout=args.drain_timeout, log_level=args.log_level)
            for role in roles
        ]  # fmt: skip
        frontend = frontend_spec(
            args, nats, served=served, tokenizer=str(model_path),
            min_workers=args.decode_workers or args.workers,
            min_prefill_workers=args.prefill_workers or 0,
        )  # fmt: skip
        return workers, frontend

    return specs_for


# -- tandem router ------------------------------------------------------------------------


def add_router(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "router",
        help="run the KV-aware router alone and ask it where prompts would go",
        description=(
            "Follow the workers of a namespace (discovery, load, KV events) like a frontend's"
            " embedded router, and answer over HTTP: POST /best_worker and /overlap_scores"
            ' with {"token_ids": [...]}, GET /health and /metrics.'
        ),
    )
    _add_runtime_flags(p)
    net = _add_listen_flags(p, port=8001)
    net.add_argument(
        "--log-level", choices=cli.LOG_LEVELS, default="info", help="log verbosity (%(default)s)"
    )
    add_router_flags(p)
    p.set_defaults(run=run_router)


def run_router(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    _use_cluster_secret(args)
    from tandem.router.service import serve_router

    sock = bind_or_report(args.host, args.port, "router")
    if sock is None:
        return 2
    with sock:
        asyncio.run(
            serve_router(
                args.nats,
                sock,
                url=f"http://{url_host(args.host)}:{args.port}",
                namespace=args.namespace,
                policy=args.router_mode,
                router_options=router_options(args),
                log_level=args.log_level,
            )
        )
    return 0


def _add_listen_flags(p: argparse.ArgumentParser, port: int) -> argparse._ArgumentGroup:
    net = p.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    net.add_argument("--port", type=cli._port, default=port, help="TCP port (%(default)s)")
    return net


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
