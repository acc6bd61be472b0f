"""`tandem`: one command, one subcommand per job.

Each subcommand is a module of this package (`serve`, `profile`, `bench`, `worker`,
`frontend`, `router`, `planner`, `deploy`) with an `add_<name>` function that declares its
flags and a `run_<name>` function that does the work; flags that several share live in
`tandem.cli.flags`. Heavy imports (torch, the engine, the server) happen inside the `run_`
functions so that `tandem --help` and flag errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tandem.cli.bench import add_bench
from tandem.cli.deploy import add_deploy
from tandem.cli.frontend import add_frontend
from tandem.cli.planner import add_planner
from tandem.cli.profile import add_profile
from tandem.cli.router import add_router
from tandem.cli.serve import add_serve
from tandem.cli.worker import add_worker


def build_parser() -> argparse.ArgumentParser:
    """The `tandem` parser with every subcommand; each sets `run` to its run function."""
    from tandem import __version__

    parser = argparse.ArgumentParser(
        prog="tandem",
        description="Tandem: serve large language models with an OpenAI-compatible API.",
    )
    parser.add_argument("--version", action="version", version=f"tandem {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_serve(subparsers)
    add_profile(subparsers)
    add_bench(subparsers)
    add_worker(subparsers)
    add_frontend(subparsers)
    add_router(subparsers)
    add_planner(subparsers)
    add_deploy(subparsers)
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
    """Run the chosen subcommand; its return value is the exit status."""
    args = parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:  # Ctrl-C; uvicorn re-raises it after its graceful exit
        return 130


if __name__ == "__main__":
    sys.exit(main())
