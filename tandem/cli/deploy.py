"""`tandem deploy validate|up|render|schema GRAPH`: one spec for the whole system.

`validate` lists every problem of the graph at once (exit 1) or prints what it would run;
`up` runs it on this machine through the same supervisor and worker/frontend specs as `tandem
serve` (each pool's engine flags parsed by `tandem serve`'s own parser); `render` writes
Kubernetes manifests, a Dockerfile, a Grafana dashboard and a Prometheus scrape config.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tandem.cli.flags import add_log_level, setup_logging
from tandem.deploy.graph import (
    SPEC_FIELDS,
    Graph,
    GraphError,
    PoolSpec,
    Problem,
    graph_schema,
    load_graph,
    pool_argv,
)

log = logging.getLogger("tandem")

#: A graph with every field and its default, commented.
EXAMPLE = Path(__file__).parents[1] / "deploy" / "graph.example.yaml"


def add_deploy(subparsers: Any) -> None:
    """Declare `tandem deploy` and its actions on `subparsers`."""
    p = subparsers.add_parser(
        "deploy",
        help="validate, run or render a whole deployment described in one graph.yaml",
        description="One spec (graph.yaml: model, frontends, router, pools, planner, NATS,"
        " secrets) checked before anything starts, run on this machine, or rendered for"
        " Kubernetes.",
    )
    p.add_argument(
        "action",
        choices=("validate", "up", "render", "schema", "example"),
        help="validate: list every problem; up: run it here (Ctrl-C drains and"
        " stops); render: write Kubernetes manifests to --out; schema: print the"
        " spec's JSON Schema; example: print a graph with every field and its default",
    )
    p.add_argument("graph", nargs="?", type=Path, help="the graph file (YAML or JSON)")
    p.add_argument("--out", type=Path, help="render: the folder to write (created)")
    add_log_level(p)
    p.set_defaults(run=run_deploy)


def run_deploy(args: argparse.Namespace) -> int:
    """0 done; 1 the graph has problems (all printed); 2 a usage error."""
    if args.action == "schema":
        print(json.dumps(graph_schema(), indent=2))
        return 0
    if args.action == "example":
        print(EXAMPLE.read_text(), end="")
        return 0
    if args.graph is None:
        print(f"tandem deploy {args.action}: error: give the graph file", file=sys.stderr)
        return 2
    if args.action == "render" and args.out is None:
        print("tandem deploy render: error: --out DIR is required", file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    try:
        graph = load_graph(args.graph)
        if args.action != "render":  # render's paths are the pods'
            graph = paths_from(graph, args.graph.parent)
        pools = checked(graph, render=args.action == "render")
    except GraphError as exc:
        print(f"{args.graph}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    if args.action == "validate":
        print(f"{args.graph}: valid")
        for line in summary(graph):
            print(f"  {line}")
        return 0
    if args.action == "render":
        from tandem.deploy.render import render

        for path in render(graph, args.out):
            print(f"wrote {path}")
        return 0
    return run_graph(graph, pools)


def paths_from(graph: Graph, folder: Path) -> Graph:
    """The graph with its relative file paths (model, disk tiers, TLS files) taken from
    `folder`, the graph file's, as a reader of the file would take them."""
    import msgspec

    def under(path: str | None) -> str | None:
        return str(folder / path) if path and not Path(path).expanduser().is_absolute() else path

    replace = msgspec.structs.replace
    pools = {
        role: replace(
            pool, kv_tiers=replace(pool.kv_tiers, disk_path=under(pool.kv_tiers.disk_path))
        )
        for role, pool in graph.pools.items()
    }
    security = graph.security
    return replace(
        graph,
        model=replace(graph.model, path=under(graph.model.path)),
        pools=replace(graph.pools, **pools),
        security=replace(security, tls_cert=under(security.tls_cert),
                         tls_key=under(security.tls_key), tls_ca=under(security.tls_ca)),
    )  # fmt: skip


def checked(graph: Graph, render: bool = False) -> dict[str, argparse.Namespace]:
    """Each pool's `tandem serve` flags, parsed; GraphError with every problem of the graph
    (its rules, each pool's engine flags, and for `render` what Kubernetes needs)."""
    from tandem.cli.engine_flags import engine_problem
    from tandem.deploy.graph_checks import check_for_kubernetes, check_graph, model_heads

    path = graph.model.path
    heads = model_heads(path)
    if render and path is not None and not Path(path).expanduser().exists():
        # the path is the pods' (in the image or a volume), not necessarily this machine's
        print(f"note: model.path is not on this machine ({heads}): rules on the model's heads"
              " not checked", file=sys.stderr)  # fmt: skip
        heads = None
    problems = check_graph(graph, heads)
    if render:
        problems += check_for_kubernetes(graph)
    else:  # the engines must start here
        problems += [
            Problem(f"pools.{role}.engine", problem)
            for role, pool in graph.pools.items()
            if (problem := engine_problem(pool.engine)) is not None
        ]
    pools = {}
    reported = {p.path for p in problems}  # the graph's rules said it already
    for role, pool in graph.pools.items():
        try:
            pools[role] = serve_args(graph, pool)
        except GraphError as exc:
            for problem in exc.problems:
                path = f"pools.{role}.{problem.path}"
                if path not in reported and f"model.{problem.path}" not in reported:
                    problems.append(Problem(path, problem.message))
    if problems:
        raise GraphError(problems)
    return pools


def serve_args(graph: Graph, pool: PoolSpec) -> argparse.Namespace:
    """`tandem serve`'s flags for the graph with this pool's engine: parsed by serve's own
    parser, so a pool's engine flags mean what they mean there."""
    from tandem.cli.serve import add_serve

    problems = []
    for name in pool.engine_args:
        if name in SPEC_FIELDS:
            message = f"set the pool's {SPEC_FIELDS[name]} (or the model's) instead"
        elif name not in engine_flag_names():
            message = "not an engine flag (`tandem worker --help` lists them)"
        else:
            continue
        problems.append(Problem(f"engine_args.{name}", message))
    # serve's own parser, raising ArgumentError instead of exiting
    strict = functools.partial(argparse.ArgumentParser, exit_on_error=False)
    subparsers = argparse.ArgumentParser().add_subparsers(parser_class=strict)
    add_serve(subparsers)
    args = None
    try:
        argv = graph_argv(graph) + pool_argv(graph, pool)
        args, unknown = subparsers.choices["serve"].parse_known_args(argv)
        problems += [
            Problem(f"engine_args.{flag[2:]}", "no such engine flag (`tandem serve --help`)")
            for flag in unknown
            if flag.startswith("--")
        ]
    except argparse.ArgumentError as exc:
        flag = (exc.argument_name or "").split("/")[0].lstrip("-")
        field = SPEC_FIELDS.get(flag, f"engine_args.{flag}")  # a flag the spec's field gave
        problems.append(Problem(field, exc.message))
    if problems:
        raise GraphError(problems)
    return args


@functools.cache
def engine_flag_names() -> frozenset[str]:
    """The flags a worker's engine takes (`tandem worker`'s engine and mock groups), without
    their dashes: all that a pool's `engine_args` may set."""
    from tandem.cli.engine_flags import add_engine_flags, add_mock_flags

    parser = argparse.ArgumentParser(add_help=False)
    add_engine_flags(parser)
    add_mock_flags(parser)
    return frozenset(o.lstrip("-") for a in parser._actions for o in a.option_strings)


def graph_argv(graph: Graph) -> list[str]:
    """The deployment-wide part of the graph as `tandem serve` flags."""
    fe, router, planner = graph.frontends, graph.router, graph.planner
    argv = [graph.model.path] if graph.model.path else []
    argv += [
        "--host",
        fe.host,
        "--port",
        str(fe.port),
        "--max-waiting",
        str(fe.max_waiting),
        "--api-server-count",
        str(fe.replicas),
        "--router-mode",
        router.mode,
        "--router-cost",
        router.cost,
    ]
    if graph.model.served_name:
        argv += ["--served-model-name", graph.model.served_name]
    pools = graph.pools
    if pools.aggregated is not None:
        argv += ["--workers", str(pools.aggregated.replicas)]
    elif pools.prefill is not None and pools.decode is not None:
        argv += [
            "--prefill-workers",
            str(pools.prefill.replicas),
            "--decode-workers",
            str(pools.decode.replicas),
        ]
    if graph.nats.address:
        argv += ["--nats", graph.nats.address]
    if planner.enabled:
        argv += [
            "--planner",
            "--ttft-slo",
            str(planner.ttft_slo),
            "--itl-slo",
            str(planner.itl_slo),
            "--planner-interval",
            str(planner.interval),
            "--max-gpu-budget",
            str(planner.gpu_budget),
            "--worker-startup",
            str(planner.worker_startup),
        ]
        for role in ("prefill", "decode"):
            pool = getattr(pools, role)
            if pool is not None and pool.max_replicas is not None:
                argv += [f"--max-{role}-workers", str(pool.max_replicas)]
    return argv


def summary(graph: Graph) -> list[str]:
    lines = [
        f"model {graph.model.path or 'the demo model'}, block size"
        f" {graph.model.block_size}, dtype {graph.model.dtype}"
    ]
    for role, pool in graph.pools.items():
        bounds = (
            f" (planner: {pool.min_replicas or 1}-{graph.max_replicas(role, pool)})"
            if graph.planner.enabled
            else ""
        )
        lines.append(
            f"pool {role}: {pool.replicas} x {pool.engine} worker, "
            f"{pool.gpus_per_worker} GPU each{bounds}"
        )
    fe = graph.frontends
    lines.append(
        f"{fe.replicas} frontend(s) at http://{fe.host}:{fe.port}/v1, router"
        f" {graph.router.mode} ({graph.router.cost})"
    )
    lines.append(
        f"NATS {graph.nats.address or 'bundled'}; planner"
        f" {'on' if graph.planner.enabled else 'off'}"
    )
    return lines


def run_graph(graph: Graph, pools: dict[str, argparse.Namespace]) -> int:
    """`up`: the same supervisor, specs and planner as `tandem serve` in distributed mode."""
    from tandem.cli.engine_flags import cuda_available, default_device, needs_weights
    from tandem.cli.frontend import frontend_spec
    from tandem.cli.planner import planner_config, planner_thread
    from tandem.cli.serve import worker_specs
    from tandem.deploy.supervisor import run_local
    from tandem.engine.model_source import (
        ModelSourceError,
        default_served_model_name,
        resolve_model,
    )
    from tandem.http.server import bind_or_report
    from tandem.runtime.framing import SECRET_ENV, TLS_ENV

    sock = bind_or_report(graph.frontends.host, graph.frontends.port, "deploy up")
    if sock is None:  # taken: said before anything starts
        return 2
    sock.close()
    first = next(iter(pools.values()))
    gpu_pools = [r for r, p in graph.pools.items() if p.gpus_per_worker and p.engine != "mock"]
    if gpu_pools and not cuda_available():
        log.warning("pools %s ask for GPUs, but torch sees none: their workers run on the CPU",
                    ", ".join(gpu_pools))  # fmt: skip
    secrets = {}
    for field, name in (("frontends.api_key_secret", graph.frontends.api_key_secret),
                        ("security.cluster_secret", graph.security.cluster_secret)):  # fmt: skip
        if name is not None and not os.environ.get(name):
            print(f"tandem deploy up: error: {field} names ${name}, which is not set",
                  file=sys.stderr)  # fmt: skip
            return 2
        secrets[field] = os.environ.get(name) if name else None
    if secrets["frontends.api_key_secret"]:  # else $TANDEM_API_KEY, as for `tandem serve`
        first.api_key = secrets["frontends.api_key_secret"]
    if secrets["security.cluster_secret"]:
        os.environ[SECRET_ENV] = secrets["security.cluster_secret"]
    tls = (graph.security.tls_cert, graph.security.tls_key, graph.security.tls_ca)
    for value, env in zip(tls, TLS_ENV, strict=True):
        if value:
            os.environ[env] = value
    try:
        need_weights = any(needs_weights(a) for a in pools.values())
        model_path = resolve_model(graph.model.path, need_weights=need_weights)
    except ModelSourceError as exc:
        print(f"tandem deploy up: error: {exc}", file=sys.stderr)
        return 2
    served = graph.model.served_name or default_served_model_name(graph.model.path)
    planning = planner_config(first)
    if isinstance(planning, str):  # checked already; kept for the flags' own rules
        print(f"tandem deploy up: error: {planning}", file=sys.stderr)
        return 2

    def specs_for(nats: str) -> tuple[list[Any], list[Any]]:
        workers = []
        for role, args in pools.items():
            device = args.device or default_device()
            roles = [role] * _replicas(graph, role)
            workers += worker_specs(args, model_path, served, device, nats, roles)
        frontend = frontend_spec(
            first,
            nats,
            served=served,
            tokenizer=str(model_path),
            min_workers=_replicas(graph, "decode") or _replicas(graph, "aggregated"),
            min_prefill_workers=_replicas(graph, "prefill"),
            reuse_port=graph.frontends.replicas > 1,
        )
        return workers, [frontend] * graph.frontends.replicas

    planner = None if planning is None else planner_thread(first, with_bounds(graph, planning))
    return run_local(specs_for, graph.nats.address, first.drain_timeout, planner)


def with_bounds(graph: Graph, config: Any) -> Any:
    """The planner's config with each pool's own min/max replicas (serve's flags bound the
    largest size only; an aggregated pool sizes the planner's decode slot)."""
    import dataclasses

    from tandem.planner import PoolBounds

    for role, pool in graph.pools.items():
        slot = "decode" if role == "aggregated" else role
        bounds = getattr(config, slot)
        low = bounds.min_replicas if pool.min_replicas is None else pool.min_replicas
        high = bounds.max_replicas if pool.max_replicas is None else pool.max_replicas
        config = dataclasses.replace(config, **{slot: PoolBounds(low, high)})
    return config


def _replicas(graph: Graph, role: str) -> int:
    pool = getattr(graph.pools, role)
    return 0 if pool is None else pool.replicas
