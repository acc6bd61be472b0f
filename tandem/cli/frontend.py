"""`tandem frontend`: the OpenAI API in front of the workers found over NATS, one half of
distributed mode (DESIGN.md, running modes). `tandem serve --workers N` starts one for you.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from tandem.cli.flags import (
    add_client_limits,
    add_frontend_flags,
    add_listen_flags,
    add_log_level,
    add_router_flags,
    add_runtime_flags,
    disagg_config,
    int_at_least,
    router_options,
    setup_logging,
    use_cluster_secret,
)

if TYPE_CHECKING:
    from tandem.deploy.specs import FrontendSpec


def add_frontend(subparsers: Any) -> None:
    """Declare `tandem frontend` and its flags on `subparsers`."""
    p = subparsers.add_parser(
        "frontend",
        help="serve the OpenAI API in front of the workers found over NATS",
        description=(
            "Serve an OpenAI-compatible HTTP API and send requests to the workers registered"
            " in NATS discovery, chosen by --router-mode. Waits for --min-workers workers;"
            " the first worker's model card gives the model name, tokenizer and context length."
        ),
    )
    add_runtime_flags(p)
    net = add_listen_flags(p, default_port=8000)
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
        type=int_at_least(1),
        default=256,
        help="requests that may wait in the workers' queues before 503 (%(default)s)",
    )
    add_client_limits(net)
    net.add_argument(
        "--min-workers",
        type=int_at_least(1),
        default=1,
        help="decode (or aggregated) workers to wait for before serving (%(default)s)",
    )
    net.add_argument(
        "--min-prefill-workers",
        type=int_at_least(0),
        default=0,
        help="prefill workers to wait for before serving (%(default)s)",
    )
    add_log_level(net)
    add_router_flags(p)
    add_frontend_flags(p)
    p.set_defaults(run=run_frontend)


def run_frontend(args: argparse.Namespace) -> int:
    """Serve until a signal stops it (0); 2 when the port cannot be had. The work is
    `tandem.deploy.child.run_frontend`'s, so a supervised frontend behaves the same."""
    setup_logging(args.log_level)
    use_cluster_secret(args)
    from tandem.deploy.child import run_frontend as run

    return run(frontend_spec(args, args.nats))


def frontend_spec(args: argparse.Namespace, nats: str, **overrides: Any) -> FrontendSpec:
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
