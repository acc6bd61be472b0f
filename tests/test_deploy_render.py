"""`tandem deploy render`: manifests valid against the Kubernetes API schemas (offline, with
kubernetes-validate), what rendering refuses, and a dashboard whose every metric a real
running deployment exports."""

from __future__ import annotations

import re
import time

import httpx
import kubernetes_validate
import msgspec
import pytest
import yaml
from nats_support import needs_nats
from process_support import serving, tandem

from tandem.cli.main import main, parse_args
from tandem.deploy.dashboard import PANELS
from tandem.deploy.graph import decode_graph
from tandem.deploy.processes import free_port
from tandem.engine.testing import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("render") / "tiny")


def k8s_graph(model) -> str:
    return (
        f"name: chat\nmodel: {{path: {model}, served_name: tiny}}\n"
        "frontends: {replicas: 2, api_key_secret: chat-api}\n"
        "pools:\n  prefill: {max_replicas: 4}\n"
        "  decode: {replicas: 2, max_replicas: 6, engine_args: {max-num-seqs: 128},"
        " kv_tiers: {host_gib: 4, disk_path: /kv, disk_gib: 20}}\n"
        "kubernetes: {model_claim: models}\n"
        "planner: {enabled: true}\nsecurity: {cluster_secret: chat-cluster}\n"
    )


def test_rendered_manifests_are_valid_kubernetes_objects(tmp_path, tiny) -> None:
    graph = tmp_path / "graph.yaml"
    graph.write_text(k8s_graph(tiny))
    out = tmp_path / "out"
    assert main(["deploy", "render", str(graph), "--out", str(out)]) == 0
    version = kubernetes_validate.latest_version()
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    kinds = {}
    for name in kustomization["resources"]:
        doc = yaml.safe_load((out / name).read_text())
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any wrong field
        kinds.setdefault(doc["kind"], []).append(doc)
    assert sorted(kinds) == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Role",
                             "RoleBinding", "Service", "ServiceAccount", "StatefulSet"]  # fmt: skip
    deployments = {d["metadata"]["name"]: d for d in kinds["Deployment"]}
    for d in deployments.values():  # each command line is one tandem accepts
        for container in d["spec"]["template"]["spec"]["containers"]:
            args = [a.replace("$(POD_IP)", "10.0.0.1") for a in container["args"]]
            parsed = parse_args(args)
            assert parsed.command == args[0] and not parsed.rest, args
    assert set(deployments) == {"chat-prefill-workers", "chat-decode-workers", "chat-frontend",
                                "chat-planner"}  # fmt: skip
    decode = deployments["chat-decode-workers"]["spec"]
    pod = decode["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert decode["replicas"] == 2 and args[:4] == ["worker", str(tiny), "--role", "decode"]
    assert args[args.index("--max-num-seqs") :][:2] == ["--max-num-seqs", "128"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert pod["containers"][0]["resources"]["requests"]["memory"] == "16Gi"  # 4 + 8 shm + 4
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["kv-disk"] == "/kv" and mounts["model"] == str(tiny)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert pod["securityContext"]["runAsNonRoot"] and pod["topologySpreadConstraints"]
    assert pod["terminationGracePeriodSeconds"] > 30  # past the worker's own drain
    frontend = deployments["chat-frontend"]["spec"]["template"]
    assert frontend["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    probe = frontend["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health"
    env = {e["name"]: e for e in frontend["spec"]["containers"][0]["env"]}
    assert env["TANDEM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "chat-api"
    assert env["TANDEM_CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "chat-cluster"
    planner = deployments["chat-planner"]["spec"]["template"]["spec"]
    assert "--decode-deployment" in planner["containers"][0]["args"]
    (role,) = kinds["Role"]
    assert {"apiGroups": ["apps"], "resources": ["deployments/scale"],
            "verbs": ["get", "patch"]} in role["rules"]  # fmt: skip
    (config,) = kinds["ConfigMap"]
    assert decode_graph(config["data"]["graph.yaml"]) == decode_graph(graph.read_text())
    assert (out / "Dockerfile").read_text().startswith("# The image")
    board = msgspec.json.decode((out / "grafana-dashboard.json").read_bytes())
    assert len(board["panels"]) == len(PANELS)
    # the validator does fail a wrong object (the check above can fail)
    broken = yaml.safe_load((out / "deployment-chat-frontend.yaml").read_text())
    broken["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


K8S_RULES = [  # (a change to the renderable graph, the field a problem names)
    ("security: {cluster_secret: null}", "security.cluster_secret"),
    ("frontends: {api_key_secret: null}", "frontends.api_key_secret"),
    ("model: {path: null}", "model.path"),
    ("security: {cluster_secret: s, tls_cert: c.pem, tls_key: k.pem}", "security.tls_cert"),
    ("pools: {prefill: {min_replicas: 2, replicas: 2}, decode: {}}", "pools.prefill.min_replicas"),
    ("pools: {aggregated: {}}", "planner.enabled"),
]


@pytest.mark.parametrize(("change", "path"), K8S_RULES, ids=[r[1] for r in K8S_RULES])
def test_render_refuses_what_kubernetes_cannot_run(change, path, tmp_path, tiny, capsys) -> None:
    base = yaml.safe_load(k8s_graph(tiny))
    base.update(yaml.safe_load(change))
    graph = tmp_path / "graph.yaml"
    graph.write_text(yaml.safe_dump(base))
    assert main(["deploy", "render", str(graph), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"  {path}: " in err, err
    assert not (tmp_path / "out").exists()


def dashboard_queries() -> list[tuple[str, set[str]]]:
    """(metric, labels it is grouped by) of every dashboard query."""
    out = []
    for _, _, queries in PANELS:
        for query in queries:
            for metric, by in re.findall(r"\b(tandem_[a-z_]+)[^()]*\)*(?: by \(([a-z_, ]+)\))?",
                                         query):  # fmt: skip
                out.append((metric, {b.strip() for b in by.split(",") if b.strip()}))
    return out


def missing_from(text: str, queries: list[tuple[str, set[str]]]) -> list[str]:
    """The queried metrics a /metrics page lacks (as a declared family or a sample), and the
    grouping labels its samples lack."""
    from prometheus_client.parser import text_string_to_metric_families

    declared = set(re.findall(r"^# TYPE (tandem_[a-z_]+)", text, re.M))
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    missing = []
    for metric, by in queries:
        base = re.sub(r"_(bucket|total)$", "", metric)
        if metric not in labels and metric not in declared and base not in declared:
            missing.append(metric)
        elif metric in labels and not by <= labels[metric]:
            missing.append(f"{metric} by {sorted(by - labels[metric])}")
    return missing


@needs_nats
def test_every_metric_on_the_dashboard_is_exported_by_a_running_deployment(
    tmp_path, tiny
) -> None:
    """`deploy up` of a mock graph with the planner on (interval 1 s): after a few requests
    the frontend's /metrics has every family the dashboard queries."""
    port = free_port()
    graph = tmp_path / "graph.yaml"
    graph.write_text(
        f"model: {{path: {tiny}, served_name: tiny}}\nfrontends: {{port: {port}}}\n"
        "pools:\n  prefill: {engine: mock, gpus_per_worker: 0, max_replicas: 1}\n"
        "  decode: {engine: mock, gpus_per_worker: 0, max_replicas: 1}\n"
        "planner: {enabled: true, interval: 1, gpu_budget: 2}\n"
    )
    up = tandem("deploy", "up", str(graph))
    with serving(up, tmp_path / "up.log", "serving 'tiny'"):
        base = f"http://127.0.0.1:{port}"
        for i in range(3):
            body = {"model": "tiny", "prompt": f"hello {i} " * 50, "max_tokens": 4}
            reply = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
            assert reply.status_code == 200, reply.text
        queries = dashboard_queries()
        assert len(queries) >= 20 and ("tandem_planner_replicas", {"pool"}) in queries
        deadline = time.monotonic() + 30
        missing = ["not read yet"]
        while missing and time.monotonic() < deadline:
            missing = missing_from(httpx.get(f"{base}/metrics").text, queries)
            time.sleep(0.5)
        assert not missing, f"the dashboard queries what nobody exports: {missing}"


def test_render_takes_a_model_path_that_only_the_pods_have(tmp_path, capsys) -> None:
    graph = tmp_path / "graph.yaml"
    graph.write_text(k8s_graph("/models/not-on-this-machine"))
    assert main(["deploy", "render", str(graph), "--out", str(tmp_path / "out")]) == 0
    assert "rules on the model's heads not checked" in capsys.readouterr().err
    # here `validate` (and `up`) need the model itself
    assert main(["deploy", "validate", str(graph)]) == 1
    assert "model.path: no such file or folder" in capsys.readouterr().err
