"""`tandem planner`: the SLA planner standalone, against NATS, acting through a connector
(`local`: it supervises the worker processes itself; `kubernetes`: it scales two
Deployments). Also the planner's flags that `tandem serve --planner` shares, and the config
they make."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any

from tandem.cli.engine_flags import add_engine_flags, add_mock_flags, default_device
from tandem.cli.flags import (
    add_log_level,
    add_runtime_flags,
    int_at_least,
    positive_float,
    setup_logging,
    use_cluster_secret,
)
from tandem.planner import PoolBounds, StepModel
from tandem.planner.plan import Planner, PlannerConfig

#: Flags that mean nothing without --planner (dest, flag).
PLANNER_ONLY = (
    ("ttft_slo", "--ttft-slo"),
    ("itl_slo", "--itl-slo"),
    ("planner_interval", "--planner-interval"),
    ("max_prefill_workers", "--max-prefill-workers"),
    ("max_decode_workers", "--max-decode-workers"),
    ("max_gpu_budget", "--max-gpu-budget"),
    ("worker_startup", "--worker-startup"),
    ("planner_profile", "--planner-profile"),
)


def add_planner(subparsers: Any) -> None:
    """Declare `tandem planner` and its flags on `subparsers`."""
    p = subparsers.add_parser(
        "planner",
        help="resize the prefill and decode pools to meet latency targets",
        description=(
            "Hear the workers' steps and the frontends' requests over NATS, forecast the load"
            " and size the prefill and decode pools to meet --ttft-slo and --itl-slo. With"
            " --connector local it starts, supervises and drains the workers itself (MODEL and"
            " the engine flags as for `tandem worker`); with --connector kubernetes it patches"
            " the scale of two Deployments (in-cluster service account, else kubeconfig)."
        ),
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="--connector local: as for"
                   " `tandem serve`")  # fmt: skip
    add_runtime_flags(p)
    c = p.add_argument_group("connector")
    c.add_argument("--connector", choices=("local", "kubernetes"), default="local",
                   help="(%(default)s)")  # fmt: skip
    c.add_argument("--prefill-workers", type=int_at_least(1), metavar="P",
                   help="local: prefill workers to start with (1)")  # fmt: skip
    c.add_argument("--decode-workers", type=int_at_least(1), metavar="D",
                   help="local: decode workers to start with (1)")  # fmt: skip
    c.add_argument("--workers", type=int_at_least(1), metavar="N",
                   help="local: one pool of N aggregated workers instead")  # fmt: skip
    c.add_argument("--served-model-name", help="local: the model name in the workers' card")
    c.add_argument("--drain-timeout", type=positive_float, default=30.0,
                   help="local: seconds a draining worker may take (%(default)s)")  # fmt: skip
    c.add_argument("--k8s-namespace", default="default", help="kubernetes: (%(default)s)")
    c.add_argument("--prefill-deployment", metavar="NAME", help="kubernetes: the prefill pool")
    c.add_argument("--decode-deployment", metavar="NAME", help="kubernetes: the decode pool")
    add_planner_flags(p, switch=False)
    add_log_level(p)
    add_engine_flags(p)
    add_mock_flags(p)
    p.set_defaults(run=run_planner, planner=True)


def add_planner_flags(p: Any, switch: bool = True) -> None:
    g = p.add_argument_group("SLA planner")
    if switch:
        g.add_argument(
            "--planner",
            action="store_true",
            help="resize the worker pools to meet --ttft-slo and --itl-slo as traffic changes,"
            " starting from --prefill-workers and --decode-workers (or --workers: one"
            " aggregated pool); its decisions are logged and exported as tandem_planner_*"
            " metrics",
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
                   " that far ahead, until it has timed its workers' start-ups (30)")  # fmt: skip
    g.add_argument("--planner-profile", metavar="FILE",
                   help="a `tandem profile` output to seed both pools' step models with, so"
                   " the planner decides before the workers' own steps have taught it")  # fmt: skip


def planner_config(args: argparse.Namespace) -> PlannerConfig | str | None:
    """The planner's config from the flags: None without --planner, or the error's text.
    The starting sizes are checked against the bounds where they come from flags."""
    if not args.planner:
        given = [flag for dest, flag in PLANNER_ONLY if getattr(args, dest) is not None]
        return f"{', '.join(given)} need --planner" if given else None
    budget = 16 if args.max_gpu_budget is None else args.max_gpu_budget
    if args.prefill_workers is None:  # `tandem serve --workers N`: one aggregated pool
        split = [flag for flag, value in (("--max-prefill-workers", args.max_prefill_workers),
                                          ("--max-decode-workers", args.max_decode_workers))
                 if value is not None]  # fmt: skip
        if split:
            return f"{', '.join(split)} bound split pools: with --workers, the bound is" \
                " --max-gpu-budget"  # fmt: skip
        if args.workers > budget:
            return f"--workers {args.workers} is above --max-gpu-budget {budget}"
        bounds = [PoolBounds(0, 0), PoolBounds(1, budget)]
    else:
        sized = getattr(args, "connector", "local") == "local"
        bounds = []
        pools = (("prefill", args.prefill_workers, args.max_prefill_workers),
                 ("decode", args.decode_workers, args.max_decode_workers))  # fmt: skip
        for pool, start, most in pools:
            most = 8 if most is None else most
            if sized and start > most:
                return f"--{pool}-workers {start} is above --max-{pool}-workers {most}"
            bounds.append(PoolBounds(1, most))
        if sized and args.prefill_workers + args.decode_workers > budget:
            return f"--prefill-workers + --decode-workers is above --max-gpu-budget {budget}"
    if args.planner_profile is not None:
        try:
            StepModel.from_profile(args.planner_profile)
        except ValueError as exc:
            return str(exc)
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
    from tandem.deploy.planning import POOLS, PlannerThread, ProcessScaler

    def make(supervisor: Any, nats_url: str) -> PlannerThread:
        aggregated = config.prefill.max_replicas == 0
        scaler = ProcessScaler(supervisor, (None, "aggregated") if aggregated else POOLS)
        planner, interval = new_planner(args, config), planner_interval(args)
        return PlannerThread(scaler, planner, nats_url, namespace=namespace(args),
                             interval=interval)  # fmt: skip

    return make


def new_planner(args: argparse.Namespace, config: PlannerConfig) -> Planner:
    """A planner whose step models start from --planner-profile, if given."""
    path = args.planner_profile
    pools = 1 if config.prefill.max_replicas == 0 else 2  # an aggregated pool: one model
    models = [StepModel() if path is None else StepModel.from_profile(path) for _ in range(pools)]
    return Planner(config, *models)


def namespace(args: argparse.Namespace) -> str:
    from tandem.protocol.worker import DEFAULT_NAMESPACE

    return getattr(args, "namespace", None) or DEFAULT_NAMESPACE


def run_planner(args: argparse.Namespace) -> int:
    """Plan until SIGTERM / Ctrl-C (0); 2 for a usage error, reported before anything
    starts."""
    setup_logging(args.log_level)
    use_cluster_secret(args)
    if args.workers is not None and (args.prefill_workers or args.decode_workers):
        print("tandem planner: error: --workers (one aggregated pool) or --prefill-workers and"
              " --decode-workers, not both", file=sys.stderr)  # fmt: skip
        return 2
    if args.workers is None:  # split pools, 1 + 1 unless told
        args.prefill_workers = args.prefill_workers or 1
        args.decode_workers = args.decode_workers or 1
    config = planner_config(args)
    if isinstance(config, str) or config is None:
        print(f"tandem planner: error: {config}", file=sys.stderr)
        return 2
    if args.connector == "kubernetes":
        return _plan_kubernetes(args, config)
    from tandem.cli.serve import worker_specs
    from tandem.deploy.supervisor import run_local
    from tandem.engine.model_source import (
        ModelSourceError,
        default_served_model_name,
        resolve_model,
    )

    try:
        model_path = resolve_model(
            args.model, need_weights=args.engine == "real" and args.load_format == "auto"
        )
    except ModelSourceError as exc:
        print(f"tandem planner: error: {exc}", file=sys.stderr)
        return 2
    served = args.served_model_name or default_served_model_name(args.model)
    device = args.device or default_device()

    def specs_for(nats: str) -> tuple[list[Any], list[Any]]:
        return worker_specs(args, model_path, served, device, nats), []  # no frontend

    return run_local(specs_for, args.nats, args.drain_timeout, planner_thread(args, config))


def _plan_kubernetes(args: argparse.Namespace, config: PlannerConfig) -> int:
    missing = [flag for flag, name in (("--prefill-deployment", args.prefill_deployment),
                                       ("--decode-deployment", args.decode_deployment))
               if not name]  # fmt: skip
    if config.prefill.max_replicas == 0:
        print("tandem planner: error: --workers is for --connector local; Kubernetes pools"
              " are a prefill and a decode Deployment", file=sys.stderr)  # fmt: skip
        return 2
    if missing:
        print(f"tandem planner: error: --connector kubernetes needs {' and '.join(missing)}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        from tandem.deploy.kubernetes import KubernetesScaler

        scaler = KubernetesScaler.connect(
            args.k8s_namespace, {"prefill": args.prefill_deployment,
                                 "decode": args.decode_deployment},
        )  # fmt: skip
    except ImportError:
        print("tandem planner: error: --connector kubernetes needs the kubernetes client:"
              " pip install 'tandem[kubernetes]'", file=sys.stderr)  # fmt: skip
        return 2
    except Exception as exc:  # no kubeconfig, no service account
        print(f"tandem planner: error: cannot reach Kubernetes: {exc}", file=sys.stderr)
        return 2
    from tandem.runtime import event_loop

    return event_loop.run(_until_signal(scaler, args, config))


async def _until_signal(scaler: Any, args: argparse.Namespace, config: PlannerConfig) -> int:
    import asyncio
    import contextlib
    import signal

    from tandem.deploy.planning import run_planner as plan

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await plan(scaler, new_planner(args, config), args.nats, stop,
               namespace=namespace(args), interval=planner_interval(args))  # fmt: skip
    return 0
