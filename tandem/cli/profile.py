"""`tandem profile`: time the real engine's steps and write the profile that the mock engine
(`tandem serve --engine mock --perf-model FILE`) interpolates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tandem.cli.engine_flags import (
    add_engine_flags,
    default_device,
    engine_config,
)
from tandem.cli.flags import (
    add_log_level,
    int_at_least,
    setup_logging,
)


def add_profile(subparsers: Any) -> None:
    """Declare `tandem profile` and its flags on `subparsers`."""
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
        type=int_at_least(1),
        nargs="+",
        default=[16, 64, 256, 1024, 2048],
        help="prompt lengths to time (%(default)s)",
    )
    p.add_argument(
        "--decode-batches",
        type=int_at_least(1),
        nargs="+",
        default=[1, 4, 16, 64],
        help="decode batch sizes to time (%(default)s)",
    )
    p.add_argument(
        "--decode-contexts",
        type=int_at_least(1),
        nargs="+",
        default=[128, 512, 2048],
        help="context lengths per sequence to time (%(default)s)",
    )
    p.add_argument(
        "--decode-steps",
        type=int_at_least(1),
        default=8,
        help="decode steps averaged per point (%(default)s)",
    )
    add_log_level(p)
    add_engine_flags(p)
    # The profile is of the real engine; the mock flags are absent, so fix what they set.
    p.set_defaults(run=run_profile, engine="real", perf_model=None, mock_speedup=1.0)


def run_profile(args: argparse.Namespace) -> int:
    """Profile and write `--output` (0); 2 when MODEL cannot be resolved."""
    setup_logging(args.log_level, with_time=False)
    from tandem.engine.mock.profile import run_profile as profile
    from tandem.engine.model_source import ModelSourceError, resolve_model

    try:
        model_path = resolve_model(args.model)
    except ModelSourceError as exc:
        print(f"tandem profile: error: {exc}", file=sys.stderr)
        return 2
    config = engine_config(args, model_path, args.device or default_device())
    profile(
        config,
        args.prefill_lengths,
        args.decode_batches,
        args.decode_contexts,
        args.decode_steps,
        output=args.output,
    )
    print(f"wrote {args.output}")
    return 0
