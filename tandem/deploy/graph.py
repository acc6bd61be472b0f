"""One spec for a whole deployment (`graph.yaml`): the model, frontends, router, worker pools,
planner, NATS and the secrets between them, checked before anything starts.

The spec is plain data (msgspec structs: unknown or mistyped fields fail with their path);
`check_graph` then finds every inconsistency between its parts at once, each `Problem`
naming the field and the fix. `tandem deploy` runs (`up`) or renders (`render`) only a graph
with no problems.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

import msgspec
from msgspec import Meta

Port = Annotated[int, Meta(ge=1, le=65535)]
AtLeastOne = Annotated[int, Meta(ge=1)]
Seconds = Annotated[float, Meta(gt=0)]
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
ROLES = ("aggregated", "prefill", "decode")

#: Engine flags a pool's `engine_args` may not carry: the graph has fields for them.
SPEC_FIELDS = {
    "dtype": "dtype",
    "block-size": "block_size",
    "engine": "engine",
    "kv-offloading-size": "kv_tiers.host_gib",
    "kv-disk-path": "kv_tiers.disk_path",
    "kv-disk-size": "kv_tiers.disk_gib",
    "device": "gpus_per_worker",
}


class Spec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class ModelSpec(Spec):
    path: str | None = None  # a Hugging Face folder or a .gguf file; None: the demo model
    served_name: str | None = None  # default: the folder or file name
    dtype: Dtype = "auto"
    block_size: AtLeastOne = 16


class FrontendsSpec(Spec):
    replicas: AtLeastOne = 1
    host: str = "127.0.0.1"
    port: Port = 8000
    api_key_secret: str | None = None  # the Secret (Kubernetes) or variable (local) with the key
    max_waiting: AtLeastOne = 256


class RouterSpec(Spec):
    mode: Literal["kv", "round_robin", "random", "least_loaded"] = "kv"
    cost: Literal["blocks", "seconds"] = "blocks"


class KvTiersSpec(Spec):
    host_gib: Annotated[float, Meta(ge=0)] = 0.0
    disk_path: str | None = None
    disk_gib: Annotated[float, Meta(ge=0)] = 0.0


class PoolSpec(Spec):
    replicas: AtLeastOne = 1
    min_replicas: AtLeastOne | None = None  # the planner's bounds (default 1 and 8)
    max_replicas: AtLeastOne | None = None
    gpus_per_worker: Annotated[int, Meta(ge=0)] = 1
    tensor_parallel_size: AtLeastOne = 1
    engine: Literal["tandem", "mock", "vllm"] = "tandem"
    engine_args: dict[str, str | int | float | bool] = msgspec.field(default_factory=dict)
    block_size: AtLeastOne | None = None  # default: model.block_size
    dtype: Dtype | None = None  # default: model.dtype
    kv_tiers: KvTiersSpec = msgspec.field(default_factory=KvTiersSpec)


class PoolsSpec(Spec):
    aggregated: PoolSpec | None = None
    prefill: PoolSpec | None = None
    decode: PoolSpec | None = None

    def items(self) -> list[tuple[str, PoolSpec]]:
        return [(r, p) for r in ROLES if (p := getattr(self, r)) is not None]


class PlannerSpec(Spec):
    enabled: bool = False
    ttft_slo: Seconds = 0.5
    itl_slo: Seconds = 0.05
    interval: Seconds = 10.0
    gpu_budget: Annotated[int, Meta(ge=2)] = 16
    worker_startup: Seconds = 30.0


class NatsSpec(Spec):
    address: str | None = None  # an existing server; None: a bundled one
    port: Port = 4222  # the bundled server's client port
    storage_gib: Annotated[float, Meta(gt=0)] = 1.0  # the bundled server's JetStream volume


class SecuritySpec(Spec):
    cluster_secret: str | None = None  # the Secret (Kubernetes) or variable (local) holding it
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None


class KubernetesSpec(Spec):
    namespace: str = "default"
    image: str = "tandem:latest"
    shm_gib: Annotated[float, Meta(gt=0)] = 8.0
    model_claim: str | None = None  # a PersistentVolumeClaim mounted read-only at model.path


class Graph(Spec):
    # A DNS label that starts with a letter: it prefixes every object's name.
    name: Annotated[str, Meta(pattern=r"^[a-z]([-a-z0-9]{0,40}[a-z0-9])?$")] = "tandem"
    model: ModelSpec = msgspec.field(default_factory=ModelSpec)
    frontends: FrontendsSpec = msgspec.field(default_factory=FrontendsSpec)
    router: RouterSpec = msgspec.field(default_factory=RouterSpec)
    pools: PoolsSpec = msgspec.field(default_factory=PoolsSpec)
    planner: PlannerSpec = msgspec.field(default_factory=PlannerSpec)
    nats: NatsSpec = msgspec.field(default_factory=NatsSpec)
    security: SecuritySpec = msgspec.field(default_factory=SecuritySpec)
    kubernetes: KubernetesSpec = msgspec.field(default_factory=KubernetesSpec)

    def block_size(self, pool: PoolSpec) -> int:
        return pool.block_size or self.model.block_size

    def dtype(self, pool: PoolSpec) -> str:
        return pool.dtype or self.model.dtype

    def max_replicas(self, role: str, pool: PoolSpec) -> int:
        """The planner's upper bound for a pool: its own, else what `tandem serve --planner`
        takes (8 a split pool, the GPU budget for an aggregated one)."""
        if pool.max_replicas is not None:
            return pool.max_replicas
        return self.planner.gpu_budget if role == "aggregated" else 8


#: The graph's sections and their types, for checking each one on its own.
SECTIONS: dict[str, Any] = get_type_hints(Graph, include_extras=True)


class Problem(msgspec.Struct, frozen=True):
    """One thing wrong with a graph: the field (`pools.decode.block_size`) and what to do."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class GraphError(ValueError):
    """A graph that cannot be used, with every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


def load_graph(path: str | Path) -> Graph:
    """The graph in a YAML (or JSON) file; GraphError names a malformed, unknown or mistyped
    field by its path."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise GraphError([Problem("$", f"cannot read {path}: {exc.strerror}")]) from None
    return decode_graph(data)


def decode_graph(data: bytes | str) -> Graph:
    """The graph in YAML (or JSON) text; GraphError with a mistyped or unknown field of each
    section (msgspec stops at a struct's first one)."""
    try:
        raw = msgspec.yaml.decode(data)
    except msgspec.DecodeError as exc:
        raise GraphError([Problem("$", f"not valid YAML: {exc}")]) from None
    try:
        return msgspec.convert(raw, type=Graph)
    except msgspec.ValidationError as exc:
        problems = _section_problems(raw) or [_problem("", exc)]
        raise GraphError(problems) from None


def _section_problems(raw: Any) -> list[Problem]:
    """Each top-level section, and each pool, checked on its own: one problem each."""
    if not isinstance(raw, dict):
        return []
    problems = [Problem(str(key), f"no such section (the spec has {', '.join(SECTIONS)})")
                for key in raw if key not in SECTIONS]  # fmt: skip
    for key, kind in SECTIONS.items():
        if key not in raw:
            continue
        parts = [(key, raw[key], kind)]
        if key == "pools" and isinstance(raw[key], dict):
            parts = [(f"pools.{role}", raw[key].pop(role), PoolSpec | None)
                     for role in ROLES if role in raw[key]] + parts  # fmt: skip
        for where, value, spec in parts:
            try:
                msgspec.convert(value, type=spec)
            except msgspec.ValidationError as exc:
                problems.append(_problem(where, exc))
    return problems


def _problem(where: str, exc: msgspec.ValidationError) -> Problem:
    message, _, at = str(exc).partition(" - at `")
    inner = at.rstrip("`").removeprefix("$").lstrip(".")
    path = ".".join(part for part in (where, inner) if part) or "$"
    return Problem(path, message)


def graph_schema() -> dict[str, Any]:
    """JSON Schema of the spec, for editors (`# yaml-language-server: $schema=...`)."""
    return msgspec.json.schema(Graph)


def pool_argv(graph: Graph, pool: PoolSpec) -> list[str]:
    """One pool's engine as `tandem serve` flags."""
    argv = [
        "--dtype",
        graph.dtype(pool),
        "--block-size",
        str(graph.block_size(pool)),
        "--engine",
        {"tandem": "real"}.get(pool.engine, pool.engine),
    ]
    if pool.gpus_per_worker == 0:
        argv += ["--device", "cpu"]
    if pool.engine == "vllm" and pool.tensor_parallel_size > 1:
        argv += ["--vllm-arg", f"tensor_parallel_size={pool.tensor_parallel_size}"]
    tiers = pool.kv_tiers
    if tiers.host_gib:
        argv += ["--kv-offloading-size", str(tiers.host_gib)]
    if tiers.disk_path is not None:
        argv += ["--kv-disk-path", tiers.disk_path, "--kv-disk-size", str(tiers.disk_gib)]
    for name, value in pool.engine_args.items():
        if name in SPEC_FIELDS:
            continue  # reported by serve_args
        if value is True:
            argv.append(f"--{name}")
        elif value is False:
            argv.append(f"--no-{name}")
        else:
            argv += [f"--{name}", str(value)]
    return argv
