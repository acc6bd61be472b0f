"""`tandem worker`: an engine that frontends find over NATS, one half of distributed mode
(DESIGN.md, running modes). `tandem serve --workers N` starts them for you on one machine.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tandem.cli.engine_flags import (
    add_engine_flags,
    add_mock_flags,
    default_device,
    engine_config,
    engine_problem,
    needs_weights,
)
from tandem.cli.flags import (
    add_log_level,
    add_runtime_flags,
    port_or_zero,
    positive_float,
    setup_logging,
    use_cluster_secret,
)

ROLES = ("aggregated", "prefill", "decode")


def add_worker(subparsers: Any) -> None:
    """Declare `tandem worker` and its flags on `subparsers`."""
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
    add_runtime_flags(p)
    w = p.add_argument_group("worker")
    w.add_argument("--role", choices=ROLES, default="aggregated", help="(%(default)s)")
    w.add_argument("--host", default="127.0.0.1", help="address of the request plane (%(default)s)")
    w.add_argument(
        "--port", type=port_or_zero, default=0, help="request plane port; 0 picks one (0)"
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
        type=positive_float,
        default=3.0,
        help="seconds after which a dead worker leaves discovery (%(default)s)",
    )
    w.add_argument(
        "--drain-timeout",
        type=positive_float,
        default=30.0,
        help="on SIGTERM, seconds allowed for in-flight requests to finish (%(default)s)",
    )
    add_log_level(w)
    add_engine_flags(p)
    add_mock_flags(p)
    p.set_defaults(run=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    """Serve until drained (0) or until the engine dies (1: the worker left discovery, and a
    supervisor restarts it); 2 when MODEL cannot be resolved. The work is
    `tandem.deploy.child.run_worker`'s, so a supervised worker behaves the same."""
    setup_logging(args.log_level)
    use_cluster_secret(args)
    from tandem.deploy.child import run_worker as run
    from tandem.deploy.specs import WorkerSpec
    from tandem.engine.model_source import (
        ModelSourceError,
        default_served_model_name,
        resolve_model,
    )

    problem = engine_problem(args.engine)
    if problem is not None:
        print(f"tandem worker: error: {problem}", file=sys.stderr)
        return 2
    device = args.device or default_device()
    try:
        model_path = resolve_model(
            args.model, need_weights=needs_weights(args)
        )
    except ModelSourceError as exc:
        print(f"tandem worker: error: {exc}", file=sys.stderr)
        return 2
    spec = WorkerSpec(
        engine=engine_config(args, model_path, device),
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
    return run(spec)
