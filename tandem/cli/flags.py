"""What the subcommands share: flag value types, flag groups, and the helpers that turn
parsed flags into configuration.

A flag group lives here as soon as two subcommands declare it, so `tandem serve` and the
`worker` / `frontend` processes it starts cannot drift apart in names, defaults or help.
Nothing heavy is imported at module level: `tandem --help` builds every subcommand's parser.
The engine's own flags are in `engine_flags`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tandem.runtime.nats_client import NATS_ENV

if TYPE_CHECKING:
    from tandem.frontend.disagg import DisaggConfig

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


# -- flag value types: a bad value becomes an argparse error naming the flag --------------


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer type that refuses values below `minimum`."""

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


def power_of_two(text: str) -> int:
    """A positive power of two (KV cache block sizes)."""
    value = int_at_least(1)(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two (8, 16, 32, ...), got {value}")
    return value


def port(text: str) -> int:
    """A TCP port in 1..65535."""
    value = int_at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {value}")
    return value


def port_or_zero(text: str) -> int:
    """A TCP port, or 0 for one the operating system picks."""
    return 0 if text == "0" else port(text)


def positive_float(text: str) -> float:
    """A finite number above 0 (timeouts, sizes, speedups)."""
    value = number(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1] (shares of GPU memory)."""
    value = number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number of 0 or more (weights, rates where 0 means off)."""
    value = number(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def number(text: str) -> float:
    """Any float, with an argparse error (not a traceback) for text that is not one."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


# -- flag groups ----------------------------------------------------------------------------


def add_log_level(group: Any) -> None:
    """`--log-level`, the same on every subcommand that logs."""
    group.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="log verbosity (%(default)s)"
    )


def add_client_limits(group: Any) -> None:
    """What one client may send: the HTTP server's (`serve`, `frontend`) abuse limits."""
    group.add_argument(
        "--max-client-rate",
        type=non_negative_float,
        default=0.0,
        help="generation requests a second one client address may send; beyond, 429 with"
        " Retry-After (0: no limit)",
    )
    group.add_argument(
        "--max-request-bytes",
        type=int_at_least(1),
        default=8 * 2**20,
        help="largest request body; a larger one gets 413 before it is parsed (%(default)s)",
    )


def add_listen_flags(p: argparse.ArgumentParser, default_port: int) -> argparse._ArgumentGroup:
    """`--host` and `--port` of an HTTP server; the group, for the caller's further flags."""
    net = p.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    net.add_argument("--port", type=port, default=default_port, help="TCP port (%(default)s)")
    return net


def add_runtime_flags(p: argparse.ArgumentParser, nats_required: bool = True) -> None:
    """NATS, namespace, cluster secret and TLS files: every process of distributed mode."""
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
            help=f"mutual TLS on the request plane: {what[flag]} (default ${env}); all three"
            " together",
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


def add_router_flags(p: argparse.ArgumentParser) -> None:
    """How a frontend (or `tandem router`) picks workers; names as in NVIDIA Dynamo."""
    from tandem.router import COSTS, POLICIES

    r = p.add_argument_group("routing")
    r.add_argument(
        "--router-mode",
        choices=POLICIES,
        default="kv",
        help="kv: the worker holding most of the prompt's KV blocks, balanced against load;"
        " or round_robin, random, least_loaded (%(default)s)",
    )
    r.add_argument(
        "--router-cost",
        choices=COSTS,
        default="blocks",
        help="kv: blocks (queued + uncached prefill blocks, tier-weighted hits, decode"
        " blocks) or seconds (the same at each worker's published prefill and KV tier load"
        " rates: an estimate of time to first token) (%(default)s)",
    )
    r.add_argument(
        "--kv-overlap-score-weight",
        type=non_negative_float,
        default=1.0,
        help="kv: credit per cached block against one block of load (%(default)s)",
    )
    r.add_argument(
        "--kv-decode-weight",
        type=non_negative_float,
        default=1.0,
        help="kv: weight of a worker's active decode blocks against queued prefill blocks"
        " (%(default)s)",
    )
    r.add_argument(
        "--router-temperature",
        type=non_negative_float,
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
        type=positive_float,
        default=120.0,
        help="with --no-kv-events: seconds a predicted block is trusted (%(default)s)",
    )


def add_frontend_flags(p: argparse.ArgumentParser) -> None:
    """A frontend's handling of lost workers and of disaggregated requests (Dynamo's names)."""
    from tandem.frontend.remote_engine import MIGRATION_LIMIT

    f = p.add_argument_group("worker failures")
    f.add_argument(
        "--migration-limit",
        type=int_at_least(0),
        default=MIGRATION_LIMIT,
        help="times a request moves to another worker, with the tokens streamed so far, when"
        " its worker dies or fails mid-stream; 0: the client gets an error (%(default)s)",
    )
    d = p.add_argument_group("disaggregated serving (when prefill workers are live)")
    d.add_argument(
        "--max-local-prefill-length",
        type=int_at_least(0),
        default=512,
        help="prefill on the decode worker when at most this many prompt tokens are uncached"
        " there (%(default)s)",
    )
    d.add_argument(
        "--max-prefill-queue-tokens",
        type=int_at_least(1),
        default=16384,
        help="a prefill worker with this many prompt tokens queued is saturated; when all are,"
        " decode workers with room prefill locally (%(default)s)",
    )


# -- from flags to configuration ------------------------------------------------------------


def router_options(args: argparse.Namespace) -> dict[str, Any]:
    """`Router` keyword arguments from `add_router_flags` flags."""
    return {
        "cost": args.router_cost,
        "credit": args.kv_overlap_score_weight,
        "decode_weight": args.kv_decode_weight,
        "temperature": args.router_temperature,
        "approx_ttl": args.router_ttl if args.no_kv_events else None,
    }


def disagg_config(args: argparse.Namespace) -> DisaggConfig:
    """The DisaggConfig of `add_frontend_flags` flags."""
    from tandem.frontend.disagg import DisaggConfig

    return DisaggConfig(
        max_local_prefill_length=args.max_local_prefill_length,
        max_prefill_queue_tokens=args.max_prefill_queue_tokens,
    )


def use_cluster_secret(args: argparse.Namespace) -> None:
    """Put the `add_runtime_flags` secret and files into the environment: the request plane
    and NATS read them from there, so children inherit them."""
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


def setup_logging(level: str, with_time: bool = True) -> None:
    """Log to stderr at `level` (a LOG_LEVELS name). Long-running servers stamp each line
    with the time; a one-shot command such as `tandem profile` does not need it."""
    stamp = "%(asctime)s " if with_time else ""
    logging.basicConfig(level=level.upper(), format=f"{stamp}%(levelname)s %(name)s: %(message)s")
