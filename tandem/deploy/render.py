"""`tandem deploy render`: a checked graph as Kubernetes manifests, with the Dockerfile of the
image they name and the monitoring they expect.

Every component runs `tandem <command>` from one image: a Deployment per worker pool
(`tandem worker --role R`, GPUs and /dev/shm, spread over nodes), one for the frontends
(`tandem frontend`, behind a Service, probed on /health) and, with the planner on, one for
`tandem planner --connector kubernetes` with the RBAC to scale the pools. Secrets are
referenced, never written. NATS is a StatefulSet with JetStream on a volume unless the graph
names a server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import yaml

from tandem.deploy.dashboard import dashboard, scrape_config
from tandem.deploy.graph import Graph, PoolSpec, pool_argv

WORKER_PORT = 9000  # each worker's request plane
BASE_MEMORY_GIB = 4  # a worker's own memory beside its host KV tier and /dev/shm
NATS_IMAGE = "nats:2.12-alpine"
APP = "app.kubernetes.io"
#: Secret keys the graph's named Secrets must hold.
API_KEY_KEY, CLUSTER_SECRET_KEY = "api-key", "cluster-secret"

DOCKERFILE = """\
# The image every rendered Tandem component runs. Build it from a checkout of Tandem:
#   docker build -f DIR/Dockerfile -t IMAGE .   (DIR: where `tandem deploy render` wrote)
FROM python:3.11-slim
RUN useradd --uid 1000 --create-home tandem
COPY . /src
RUN pip install --no-cache-dir "/src[{extras}]" && rm -rf /src
USER 1000
ENTRYPOINT ["tandem"]
"""


def render(graph: Graph, out: Path) -> list[Path]:
    """Write the manifests of `graph` (checked) to `out`; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    docs = manifests(graph)
    files = {f"{d['kind'].lower()}-{d['metadata']['name']}.yaml": d for d in docs}
    written = []
    for name, doc in files.items():
        written.append(_write(out / name, _yaml(doc)))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": graph.kubernetes.namespace,
        "resources": list(files),
    }
    written.append(_write(out / "kustomization.yaml", _yaml(kustomization)))
    vllm = any(pool.engine == "vllm" for _, pool in graph.pools.items())
    extras = "kubernetes,vllm" if vllm else "kubernetes"
    written.append(_write(out / "Dockerfile", DOCKERFILE.format(extras=extras)))
    board = json.dumps(dashboard(graph.name), indent=2)
    written.append(_write(out / "grafana-dashboard.json", board))
    scrape = _yaml(scrape_config(graph.kubernetes.namespace))
    written.append(_write(out / "prometheus-scrape.yaml", scrape))
    return written


class _Dumper(yaml.SafeDumper):
    """Plain YAML: a mapping used twice (a selector and its labels) is written twice, not as
    an anchor and an alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _yaml(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def manifests(graph: Graph) -> list[dict[str, Any]]:
    """Every Kubernetes object of the graph, as plain dicts."""
    name = graph.name
    spec_yaml = msgspec.yaml.encode(graph).decode()
    docs: list[dict[str, Any]] = [
        _object("v1", "ConfigMap", f"{name}-graph", graph, data={"graph.yaml": spec_yaml}),
    ]
    if graph.nats.address is None:
        docs += _nats(graph)
    for role, pool in graph.pools.items():
        component = f"{role}-workers"
        docs.append(
            _deployment(
                graph, component, pool.replicas, _worker_pod(graph, role, pool), spread=True
            )
        )
        docs.append(_pdb(graph, component))
    fe = graph.frontends
    docs.append(_deployment(graph, "frontend", fe.replicas, _frontend_pod(graph), spread=True))
    docs.append(_pdb(graph, "frontend"))
    docs.append(_service(graph, "frontend", fe.port, "http"))
    if graph.planner.enabled:
        docs += _planner(graph)
    return docs


def _labels(graph: Graph, component: str) -> dict[str, str]:
    return {f"{APP}/name": "tandem", f"{APP}/instance": graph.name, f"{APP}/component": component}


def _object(api: str, kind: str, name: str, graph: Graph, **body: Any) -> dict[str, Any]:
    meta = {
        "name": name,
        "namespace": graph.kubernetes.namespace,
        "labels": _labels(graph, name.removeprefix(f"{graph.name}-")),
    }
    return {"apiVersion": api, "kind": kind, "metadata": meta, **body}


def _deployment(
    graph: Graph, component: str, replicas: int, pod: dict[str, Any], spread: bool = False
) -> dict[str, Any]:
    labels = _labels(graph, component)
    if spread:  # replicas on different nodes where the scheduler can
        pod["topologySpreadConstraints"] = [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": labels},
            }
        ]
    return _object(
        "apps/v1",
        "Deployment",
        f"{graph.name}-{component}",
        graph,
        spec={
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": pod.pop("annotations", {})},
                "spec": pod,
            },
        },
    )


def _pdb(graph: Graph, component: str) -> dict[str, Any]:
    return _object(
        "policy/v1",
        "PodDisruptionBudget",
        f"{graph.name}-{component}",
        graph,
        spec={"maxUnavailable": 1, "selector": {"matchLabels": _labels(graph, component)}},
    )


def _service(graph: Graph, component: str, port: int, port_name: str) -> dict[str, Any]:
    return _object(
        "v1",
        "Service",
        f"{graph.name}-{component}",
        graph,
        spec={
            "selector": _labels(graph, component),
            "ports": [{"name": port_name, "port": port, "targetPort": port_name}],
        },
    )


def _nats_url(graph: Graph) -> str:
    return graph.nats.address or f"nats://{graph.name}-nats:{graph.nats.port}"


def _env(graph: Graph) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "TANDEM_CACHE", "value": "/cache"}]
    if graph.security.cluster_secret:
        env.append(
            {
                "name": "TANDEM_CLUSTER_SECRET",
                "valueFrom": {
                    "secretKeyRef": {
                        "name": graph.security.cluster_secret,
                        "key": CLUSTER_SECRET_KEY,
                    }
                },
            }
        )
    return env


def _container(graph: Graph, name: str, args: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "image": graph.kubernetes.image,
        "args": args,
        "env": _env(graph),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
        **extra,
    }


def _pod(containers: list[dict[str, Any]], volumes: list[dict[str, Any]], **extra: Any) -> dict:
    return {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": containers,
        "volumes": [{"name": "cache", "emptyDir": {}}, *volumes],
        **extra,
    }


def _worker_pod(graph: Graph, role: str, pool: PoolSpec) -> dict[str, Any]:
    args = ["worker", *([graph.model.path] if graph.model.path else []), "--role", role,
            "--nats", _nats_url(graph), "--host", "0.0.0.0", "--port", str(WORKER_PORT),
            "--advertise-host", "$(POD_IP)", *pool_argv(graph, pool)]  # fmt: skip
    if graph.model.served_name:
        args += ["--served-model-name", graph.model.served_name]
    tiers = pool.kv_tiers
    # The host tier's pinned blocks and /dev/shm count against the pod's memory.
    memory = f"{tiers.host_gib + graph.kubernetes.shm_gib + BASE_MEMORY_GIB:g}Gi"
    resources: dict[str, Any] = {"requests": {"memory": memory}}
    if pool.gpus_per_worker:
        resources["limits"] = {"nvidia.com/gpu": pool.gpus_per_worker}
        resources["requests"]["nvidia.com/gpu"] = pool.gpus_per_worker
    probe = {"tcpSocket": {"port": "plane"}, "periodSeconds": 10}
    container = _container(
        graph,
        "worker",
        args,
        ports=[{"name": "plane", "containerPort": WORKER_PORT}],
        resources=resources,
        # loading a model takes minutes: liveness starts once the plane is up
        startupProbe={**probe, "failureThreshold": 180},
        readinessProbe=probe,
        livenessProbe=probe,
    )
    container["env"].append(
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    )
    volumes = [
        {
            "name": "shm",
            "emptyDir": {"medium": "Memory", "sizeLimit": f"{graph.kubernetes.shm_gib}Gi"},
        }
    ]
    container["volumeMounts"].append({"name": "shm", "mountPath": "/dev/shm"})
    if tiers.disk_path is not None:
        volumes.append({"name": "kv-disk", "emptyDir": {"sizeLimit": f"{tiers.disk_gib:g}Gi"}})
        container["volumeMounts"].append({"name": "kv-disk", "mountPath": tiers.disk_path})
    volumes += _model_volume(graph, container)
    # Longer than a worker's own drain (30 s), so that it finishes or migrates its streams.
    return _pod([container], volumes, terminationGracePeriodSeconds=60)


def _model_volume(graph: Graph, container: dict[str, Any]) -> list[dict[str, Any]]:
    """`kubernetes.model_claim` mounted read-only at model.path (none: the image has it)."""
    claim = graph.kubernetes.model_claim
    if claim is None:
        return []
    container["volumeMounts"].append(
        {"name": "model", "mountPath": graph.model.path, "readOnly": True}
    )
    return [{"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}]


def _frontend_pod(graph: Graph) -> dict[str, Any]:
    fe, router = graph.frontends, graph.router
    args = ["frontend", "--nats", _nats_url(graph), "--host", "0.0.0.0", "--port", str(fe.port),
            "--router-mode", router.mode, "--router-cost", router.cost,
            "--max-waiting", str(fe.max_waiting)]  # fmt: skip
    if graph.model.path:
        args += ["--tokenizer", graph.model.path]
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10}
    container = _container(
        graph,
        "frontend",
        args,
        ports=[{"name": "http", "containerPort": fe.port}],
        readinessProbe=probe,
        livenessProbe={**probe, "failureThreshold": 6},
    )
    if fe.api_key_secret:
        container["env"].append(
            {
                "name": "TANDEM_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": fe.api_key_secret, "key": API_KEY_KEY}},
            }
        )
    pod = _pod([container], _model_volume(graph, container))
    pod["annotations"] = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(fe.port),
        "prometheus.io/path": "/metrics",
    }
    return pod


def _nats(graph: Graph) -> list[dict[str, Any]]:
    labels = _labels(graph, "nats")
    port = graph.nats.port
    container = {
        "name": "nats",
        "image": NATS_IMAGE,
        "args": ["--jetstream", "--store_dir", "/data", "--port", str(port), "--http_port", "8222"],
        "ports": [
            {"name": "client", "containerPort": port},
            {"name": "monitor", "containerPort": 8222},
        ],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "monitor"}},
        "livenessProbe": {"httpGet": {"path": "/healthz?js-enabled-only=true", "port": "monitor"}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    claim = {
        "metadata": {"name": "data"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": f"{graph.nats.storage_gib}Gi"}},
        },
    }
    pod = _pod([container], [])
    pod["volumes"] = []
    stateful = _object(
        "apps/v1",
        "StatefulSet",
        f"{graph.name}-nats",
        graph,
        spec={
            "serviceName": f"{graph.name}-nats",
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod},
            "volumeClaimTemplates": [claim],
        },
    )
    return [stateful, _service(graph, "nats", port, "client")]


def _planner(graph: Graph) -> list[dict[str, Any]]:
    name, planner, pools = f"{graph.name}-planner", graph.planner, graph.pools
    args = ["planner", "--connector", "kubernetes", "--nats", _nats_url(graph),
            "--k8s-namespace", graph.kubernetes.namespace, "--ttft-slo", str(planner.ttft_slo),
            "--itl-slo", str(planner.itl_slo), "--planner-interval", str(planner.interval),
            "--max-gpu-budget", str(planner.gpu_budget),
            "--worker-startup", str(planner.worker_startup),
            "--prefill-deployment", f"{graph.name}-prefill-workers",
            "--decode-deployment", f"{graph.name}-decode-workers"]  # fmt: skip
    for role in ("prefill", "decode"):
        if getattr(pools, role).max_replicas is not None:
            args += [f"--max-{role}-workers", str(getattr(pools, role).max_replicas)]
    pod = _pod([_container(graph, "planner", args)], [], serviceAccountName=name)
    # What the Kubernetes connector calls: read a Deployment, patch its scale subresource.
    rules = [
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
        {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "patch"]},
    ]
    binding = {
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [
            {"kind": "ServiceAccount", "name": name, "namespace": graph.kubernetes.namespace}
        ],
    }
    return [
        _object("v1", "ServiceAccount", name, graph),
        _object("rbac.authorization.k8s.io/v1", "Role", name, graph, rules=rules),
        _object("rbac.authorization.k8s.io/v1", "RoleBinding", name, graph, **binding),
        _deployment(graph, "planner", 1, pod),
    ]
