"""The rules a graph must keep before anything starts: what other stacks find only at run time
(block sizes or dtypes that differ between pools, parallel sizes that do not split the heads,
disaggregation without a prefill pool, planner bounds that contradict the sizes) is a
`Problem` here, each naming its field and the fix, all of them at once."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from tandem.deploy.graph import Graph, PoolSpec, Problem

#: The bundled NATS server's HTTP monitoring port (its probes use it).
NATS_MONITOR_PORT = 8222
#: (attention heads, KV heads) of a model, or why they cannot be read.
Heads = tuple[int, int]


def check_graph(graph: Graph, heads: Heads | str | None) -> list[Problem]:
    """Every problem of `graph`; `heads` are the model's (None: not looked up, the rules that
    need them are skipped; a string: why the model could not be read)."""
    problems = _pools(graph) + _sizes(graph) + _planner(graph) + _network(graph)
    if isinstance(heads, str):
        problems.append(Problem("model.path", heads))
    for role, pool in graph.pools.items():
        problems += _pool(f"pools.{role}", pool, heads if isinstance(heads, tuple) else None)
    return problems


def model_heads(path: str | None) -> Heads | str:
    """The model's attention and KV heads from its config.json or GGUF header, or the reason
    they cannot be read (a missing file, not a model)."""
    from tandem.engine.model_source import demo_gguf_path

    try:
        source = Path(path).expanduser() if path else demo_gguf_path()
    except Exception as exc:  # the demo package missing
        return f"no model given and the demo model is not installed ({exc})"
    if source.is_dir():
        config = source / "config.json"
        if not config.is_file():
            return f"{source} is a folder without config.json: not a Hugging Face model folder"
        try:
            data = json.loads(config.read_text())
            heads = int(data["num_attention_heads"])
            return heads, int(data.get("num_key_value_heads", heads))
        except (ValueError, KeyError, TypeError) as exc:
            return f"{config} does not give the attention heads ({exc!r})"
    if source.is_file() and source.suffix == ".gguf":
        return _gguf_heads(source)
    if not source.exists():
        return f"no such file or folder: {source}"
    return f"{source} is neither a model folder nor a .gguf file"


def _gguf_heads(source: Path) -> Heads | str:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(source)
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        heads = int(reader.fields[f"{arch}.attention.head_count"].parts[-1][0])
        kv = reader.fields.get(f"{arch}.attention.head_count_kv")
        return heads, int(kv.parts[-1][0]) if kv is not None else heads
    except (OSError, ValueError, KeyError) as exc:
        return f"{source} is not a readable GGUF model ({exc!r})"


def _pools(graph: Graph) -> list[Problem]:
    pools = graph.pools
    if not pools.items():
        return [
            Problem(
                "pools", "no worker pool: add pools.aggregated, or pools.prefill and pools.decode"
            )
        ]
    if pools.aggregated is not None and (pools.prefill or pools.decode):
        return [
            Problem(
                "pools.aggregated",
                "an aggregated pool or prefill and decode pools, not both: remove one",
            )
        ]
    if pools.decode is not None and pools.prefill is None:
        return [
            Problem(
                "pools.prefill",
                "a decode pool takes its KV from a prefill pool: add"
                " pools.prefill, or rename pools.decode to pools.aggregated",
            )
        ]
    if pools.prefill is not None and pools.decode is None:
        return [
            Problem(
                "pools.decode",
                "a prefill pool hands its KV to a decode pool: add"
                " pools.decode, or rename pools.prefill to pools.aggregated",
            )
        ]
    return []


def _sizes(graph: Graph) -> list[Problem]:
    """One block size and one dtype across pools: KV blocks move between them and the router
    hashes blocks of one size."""
    problems = []
    items = graph.pools.items()
    if items:
        first_role, first = items[0]
        for role, pool in items[1:]:
            for field, mine, theirs in (
                ("block_size", graph.block_size(pool), graph.block_size(first)),
                ("dtype", graph.dtype(pool), graph.dtype(first)),
            ):
                if mine != theirs:
                    problems.append(
                        Problem(
                            f"pools.{role}.{field}",
                            f"{mine} here, {theirs} in pools.{first_role}:"
                            " KV moves between pools and the router hashes its blocks, so both must"
                            f" agree; set model.{field} once and drop the pools' own",
                        )
                    )
            if pool.engine != first.engine:
                problems.append(
                    Problem(
                        f"pools.{role}.engine",
                        f"{pool.engine} here, {first.engine} in pools.{first_role}: only"
                        " engines of one kind exchange KV; use one engine",
                    )
                )
            if pool.tensor_parallel_size != first.tensor_parallel_size:
                problems.append(
                    Problem(
                        f"pools.{role}.tensor_parallel_size",
                        f"{pool.tensor_parallel_size} here,"
                        f" {first.tensor_parallel_size} in pools.{first_role}: KV moves between"
                        " pools shard by shard; use one size",
                    )
                )
    for role, pool in [("model", None), *items]:
        size = graph.model.block_size if pool is None else pool.block_size
        if size is not None and size & (size - 1):
            where = "model" if pool is None else f"pools.{role}"
            problems.append(
                Problem(
                    f"{where}.block_size",
                    f"{size} is not a power of two (the attention kernels need one): use 16 or 32",
                )
            )
    return problems


def _pool(where: str, pool: PoolSpec, heads: Heads | None) -> list[Problem]:
    problems = []
    tp = pool.tensor_parallel_size
    if heads is not None and (heads[0] % tp or heads[1] % tp):
        fits = [n for n in range(1, heads[1] + 1) if heads[0] % n == 0 and heads[1] % n == 0]
        problems.append(
            Problem(
                f"{where}.tensor_parallel_size",
                f"{tp} does not divide the model's {heads[0]} attention heads and {heads[1]}"
                f" KV heads (the sizes that do: {fits})",
            )
        )
    if tp > 1 and pool.engine != "vllm":
        problems.append(
            Problem(
                f"{where}.tensor_parallel_size",
                f"{tp}: Tandem's engine runs one GPU per worker (tensor parallelism is issue"
                " #19): use 1",
            )
        )
    elif tp > 1 and pool.gpus_per_worker < tp:
        problems.append(
            Problem(
                f"{where}.gpus_per_worker",
                f"{pool.gpus_per_worker} is below"
                f" tensor_parallel_size {tp}: each shard needs its own GPU",
            )
        )
    tiers = pool.kv_tiers
    if (tiers.disk_path is None) != (tiers.disk_gib == 0):
        problems.append(
            Problem(
                f"{where}.kv_tiers",
                "disk_path and disk_gib go together: set both for a disk tier, or neither",
            )
        )
    return problems


def _planner(graph: Graph) -> list[Problem]:
    problems = []
    planner = graph.planner
    for role, pool in graph.pools.items():
        where = f"pools.{role}"
        low, high = pool.min_replicas, pool.max_replicas
        if not planner.enabled:
            if low is not None or high is not None:
                field = "min_replicas" if low is not None else "max_replicas"
                problems.append(
                    Problem(
                        f"{where}.{field}",
                        "bounds are for the planner: set planner.enabled: true, or remove them",
                    )
                )
            continue
        low = 1 if low is None else low
        high = graph.max_replicas(role, pool)
        if low > high:
            problems.append(Problem(f"{where}.min_replicas", f"{low} is above max_replicas {high}"))
        elif not low <= pool.replicas <= high:
            problems.append(
                Problem(
                    f"{where}.replicas",
                    f"{pool.replicas} is outside the"
                    f" planner's bounds [{low}, {high}]: start within them",
                )
            )
    if planner.enabled:
        start = sum(p.replicas for _, p in graph.pools.items())
        if start > planner.gpu_budget:
            problems.append(
                Problem(
                    "planner.gpu_budget",
                    f"{planner.gpu_budget} is below the {start} workers the pools start with",
                )
            )
    return problems


def _network(graph: Graph) -> list[Problem]:
    problems = []
    nats, security = graph.nats, graph.security
    if nats.address is None and nats.port == NATS_MONITOR_PORT:
        problems.append(
            Problem(
                "nats.port",
                f"{nats.port} is the bundled NATS server's monitoring port: use another",
            )
        )
    if nats.address is not None and not nats.address.startswith(("nats://", "tls://")):
        problems.append(
            Problem(
                "nats.address",
                f"{nats.address!r} is not a NATS URL: write nats://HOST:PORT (or tls://)",
            )
        )
    if (security.tls_cert is None) != (security.tls_key is None):
        missing = "tls_key" if security.tls_key is None else "tls_cert"
        problems.append(Problem(f"security.{missing}", "tls_cert and tls_key go together"))
    if not _loopback(graph.frontends.host) and security.cluster_secret is None:
        problems.append(
            Problem(
                "security.cluster_secret",
                f"frontends.host"
                f" {graph.frontends.host} reaches beyond this machine: name the"
                " cluster secret its components prove they belong with",
            )
        )
    return problems


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_for_kubernetes(graph: Graph) -> list[Problem]:
    """What rendering for Kubernetes needs beyond a graph that runs here."""
    problems = []
    if graph.security.cluster_secret is None:
        problems.append(
            Problem(
                "security.cluster_secret",
                "pods talk across the network: name"
                " the Secret (key 'cluster-secret') that holds the secret",
            )
        )
    if graph.frontends.api_key_secret is None:
        problems.append(
            Problem(
                "frontends.api_key_secret",
                "a served API needs a key: name the Secret (key 'api-key') that holds it",
            )
        )
    if graph.model.path is None or Path(graph.model.path).suffix == ".gguf":
        problems.append(
            Problem(
                "model.path",
                "the pods need a model folder (config.json,"
                " weights, tokenizer) at this path: in the image or a volume",
            )
        )
    security = graph.security
    for field in ("tls_cert", "tls_key", "tls_ca"):
        if getattr(security, field) is not None:
            problems.append(
                Problem(
                    f"security.{field}",
                    "TLS files are not rendered (the cluster secret authenticates peers in the"
                    " cluster): remove them, or mount them and set TANDEM_TLS_* by hand",
                )
            )
    for role, pool in graph.pools.items():
        if pool.min_replicas not in (None, 1):
            problems.append(
                Problem(
                    f"pools.{role}.min_replicas",
                    f"{pool.min_replicas}: the Kubernetes planner keeps pools at 1 or more; use 1",
                )
            )
    if graph.planner.enabled and graph.pools.aggregated is not None:
        problems.append(
            Problem(
                "planner.enabled",
                "the Kubernetes planner scales a prefill and"
                " a decode Deployment; an aggregated pool is planned by `up`",
            )
        )
    return problems
