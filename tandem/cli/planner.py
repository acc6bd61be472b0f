"""The SLA planner's flags (`tandem serve --planner ...`) and the config they make."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from tandem.cli.flags import int_at_least, positive_float
from tandem.planner import PoolBounds
from tandem.planner.plan import PlannerConfig

#: Flags that mean nothing without --planner (dest, flag).
PLANNER_ONLY = (
    ("ttft_slo", "--ttft-slo"),
    ("itl_slo", "--itl-slo"),
    ("planner_interval", "--planner-interval"),
    ("max_prefill_workers", "--max-prefill-workers"),
    ("max_decode_workers", "--max-decode-workers"),
    ("max_gpu_budget", "--max-gpu-budget"),
    ("worker_startup", "--worker-startup"),
)


def add_planner_flags(p: Any) -> None:
    g = p.add_argument_group("SLA planner")
    g.add_argument(
        "--planner",
        action="store_true",
        help="resize the prefill and decode pools to meet --ttft-slo and --itl-slo as traffic"
        " changes, starting from --prefill-workers and --decode-workers; its decisions are"
        " logged and exported as tandem_planner_* metrics",
    )
    g.add_argument("--ttft-slo", type=positive_float, metavar="SECONDS",
                   help="time-to-first-token target, p90 (0.5)")  # fmt: skip
    g.add_argument("--itl-slo", type=positive_float, metavar="SECONDS",
                   help="inter-token latency target, p90 (0.05)")  # fmt: skip
    g.add_argument("--planner-interval", type=positive_float, metavar="SECONDS",
                   help="seconds between two decisions (10)")  # fmt: skip
    g.add_argument("--max-prefill-workers", type=int_at_least(1), metavar="N",
                   help="largest prefill pool (8)")  # fmt: skip
    g.add_argument("--max-decode-workers", type=int_at_least(1), metavar="N",
                   help="largest decode pool (8)")  # fmt: skip
    g.add_argument("--max-gpu-budget", type=int_at_least(2), metavar="N",
                   help="workers in both pools together, at most (16)")  # fmt: skip
    g.add_argument("--worker-startup", type=positive_float, metavar="SECONDS",
                   help="how long a new worker takes to serve: the planner sizes for the load"
                   " that far ahead (30)")  # fmt: skip


def planner_config(args: argparse.Namespace) -> PlannerConfig | str | None:
    """The planner's config from the flags: None without --planner, or the error's text."""
    if not args.planner:
        given = [flag for dest, flag in PLANNER_ONLY if getattr(args, dest) is not None]
        return f"{', '.join(given)} need --planner" if given else None
    if args.prefill_workers is None:
        return "--planner sizes the prefill and decode pools: give --prefill-workers and" \
            " --decode-workers (the sizes it starts from)"  # fmt: skip
    bounds = []
    pools = (("prefill", args.prefill_workers, args.max_prefill_workers),
             ("decode", args.decode_workers, args.max_decode_workers))  # fmt: skip
    for pool, start, most in pools:
        most = 8 if most is None else most
        if start > most:
            return f"--{pool}-workers {start} is above --max-{pool}-workers {most}"
        bounds.append(PoolBounds(1, most))
    budget = 16 if args.max_gpu_budget is None else args.max_gpu_budget
    if args.prefill_workers + args.decode_workers > budget:
        return f"--prefill-workers + --decode-workers is above --max-gpu-budget {budget}"
    interval = planner_interval(args)
    startup = 30.0 if args.worker_startup is None else args.worker_startup
    return PlannerConfig(
        ttft_s=args.ttft_slo or 0.5, itl_s=args.itl_slo or 0.05, prefill=bounds[0],
        decode=bounds[1], gpu_budget=budget, lead_intervals=max(1, math.ceil(startup / interval)),
    )  # fmt: skip


def planner_interval(args: argparse.Namespace) -> float:
    return 10.0 if args.planner_interval is None else args.planner_interval


def planner_thread(args: argparse.Namespace, config: PlannerConfig) -> Callable[..., Any]:
    """What `run_local` starts beside its supervisor: the planner on its own thread."""
    from tandem.deploy.planning import PlannerThread
    from tandem.protocol.worker import DEFAULT_NAMESPACE

    namespace = getattr(args, "namespace", None) or DEFAULT_NAMESPACE

    def make(supervisor: Any, nats_url: str) -> PlannerThread:
        return PlannerThread(supervisor, nats_url, config, namespace=namespace,
                             interval=planner_interval(args))  # fmt: skip

    return make
