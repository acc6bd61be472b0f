"""`tandem bench`: load-test a running server.

Its flags belong to `tandem.bench.cli`, imported only when `tandem bench` runs, so the rest
of the command works without the benchmark package and its dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any


def add_bench(subparsers: Any) -> None:
    """Declare `tandem bench`; every flag after it is left for `tandem.bench.cli`."""
    p = subparsers.add_parser(
        "bench",
        help="load-test a running server (see: tandem bench --help)",
        add_help=False,
    )
    p.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    """Parse `args.rest` with the benchmark's own flags and run it; 2 when it is missing."""
    bench_cli = optional_module("tandem.bench.cli")
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


def optional_module(name: str) -> ModuleType | None:
    """Import `name` if it exists; errors raised inside an existing module still surface."""
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except ModuleNotFoundError:  # a parent package is missing
        return None
    return importlib.import_module(name)
