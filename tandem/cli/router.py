"""`tandem router`: the KV-aware router alone, answering over HTTP where prompts would go.

It follows the workers of a namespace as a frontend's embedded router does, so one can see
(and debug) routing decisions without serving traffic.
"""

from __future__ import annotations

import argparse
from typing import Any

from tandem.cli.flags import (
    add_listen_flags,
    add_log_level,
    add_router_flags,
    add_runtime_flags,
    router_options,
    setup_logging,
    use_cluster_secret,
)
from tandem.runtime import event_loop


def add_router(subparsers: Any) -> None:
    """Declare `tandem router` and its flags on `subparsers`."""
    p = subparsers.add_parser(
        "router",
        help="run the KV-aware router alone and ask it where prompts would go",
        description=(
            "Follow the workers of a namespace (discovery, load, KV events) like a frontend's"
            " embedded router, and answer over HTTP: POST /best_worker and /overlap_scores"
            ' with {"token_ids": [...]}, GET /health and /metrics.'
        ),
    )
    add_runtime_flags(p)
    net = add_listen_flags(p, default_port=8001)
    add_log_level(net)
    add_router_flags(p)
    p.set_defaults(run=run_router)


def run_router(args: argparse.Namespace) -> int:
    """Serve until a signal stops it (0); 2 when the port cannot be had."""
    setup_logging(args.log_level)
    use_cluster_secret(args)
    from tandem.http.server import bind_or_report, url_host
    from tandem.router.service import serve_router

    sock = bind_or_report(args.host, args.port, "router")
    if sock is None:
        return 2
    with sock:
        event_loop.run(
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
