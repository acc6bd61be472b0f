"""The planner's Kubernetes connector with the official `kubernetes` client against a fake
API server (real HTTP on 127.0.0.1; no cluster runs here), and `tandem planner --connector
kubernetes` end to end: fleet reports over a real nats-server in, scale patches out."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
from fake_kube import FakeKube
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from nats_support import needs_nats

from tandem.deploy.kubernetes import KubernetesScaler
from tandem.deploy.processes import NatsServer
from tandem.protocol.observations import (
    FrontendRequests,
    RequestSample,
    StepSample,
    WorkerSteps,
    requests_subject,
    steps_subject,
)
from tandem.runtime.nats_event_plane import NatsEventPlane

POOLS = {"prefill": "llama-prefill", "decode": "llama-decode"}


def scaler_for(kube: FakeKube, **kw) -> KubernetesScaler:
    api = client.ApiClient(client.Configuration(host=kube.url))
    return KubernetesScaler(client.AppsV1Api(api), kube.namespace, POOLS, **kw)


def test_the_connector_reads_and_scales_the_deployments():
    with FakeKube("serving", {"llama-prefill": 1, "llama-decode": 2}) as kube:
        now = [0.0]
        scaler = scaler_for(kube, clock=lambda: now[0])

        async def main():
            with pytest.raises(RuntimeError, match="not been read"):
                scaler.replicas()  # never act on pools it has not seen
            await scaler.refresh()
            assert scaler.replicas() == (1, 2) and scaler.starting() == (0, 0)
            await scaler.scale(2, 2)  # only what changed is patched
            assert kube.patches == [("llama-prefill", 2)]
            await scaler.refresh()
            assert scaler.replicas() == (2, 2) and scaler.starting() == (1, 0)
            assert scaler.measured_startup() is None
            now[0] += 75.0
            kube.ready["llama-prefill"] = 2  # the new pod passed its readiness probe
            await scaler.refresh()
            assert scaler.starting() == (0, 0)
            assert scaler.measured_startup() == 75.0  # from the scale-up to ready

        asyncio.run(main())
    with pytest.raises(ValueError, match="decode pool"):
        KubernetesScaler(None, "serving", {"prefill": "p"})


def test_a_missing_deployment_is_an_error_not_a_guess():
    with FakeKube("serving", {"llama-prefill": 1}) as kube:
        scaler = scaler_for(kube, poll_s=0.05)

        async def main():
            with pytest.raises(ApiException) as failed:
                await scaler.refresh()
            assert failed.value.status == 404
            follow = asyncio.ensure_future(scaler.follow())
            await asyncio.sleep(0.3)  # it logs and retries; it does not end
            assert not follow.done()
            follow.cancel()
            with pytest.raises(RuntimeError, match="not been read"):
                scaler.replicas()

        asyncio.run(main())


async def report_a_busy_fleet(url: str, namespace: str) -> None:
    """Steps of three sizes from a prefill and a decode worker; a frontend's requests."""
    events = await NatsEventPlane.connect(url)
    try:
        prefill = [StepSample(n, n * (n + 1) // 2, 0, 0, 0.01 + 1e-4 * n) for n in (100, 200, 400)]
        decode = [StepSample(0, 0, b, 300 * b, 0.005 + 0.001 * b) for b in (1, 4, 8)]
        for worker, role, steps in (("p0", "prefill", prefill), ("d0", "decode", decode)):
            report = WorkerSteps(worker_id=worker, role=role, steps=steps * 4)
            await events.publish(steps_subject(namespace, worker), report)
        finished = [RequestSample(300, 0, 100, 0.05, 0.01)] * 20
        report = FrontendRequests(frontend_id="f0", arrived=20, finished=finished)
        await events.publish(requests_subject(namespace, "f0"), report)
    finally:
        await events.close()


@needs_nats
def test_tandem_planner_scales_the_deployments_from_what_the_fleet_reports(tmp_path):
    with FakeKube("serving", {"llama-prefill": 1, "llama-decode": 1}) as kube, \
            NatsServer() as nats:  # fmt: skip
        env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig(tmp_path / "kubeconfig"))}
        log_path = tmp_path / "planner.log"
        with open(log_path, "w") as log:
            # Targets no worker can meet: both pools grow to their bounds.
            proc = subprocess.Popen(
                [sys.executable, "-m", "tandem.cli.main", "planner", "--nats", nats.url,
                 "--connector", "kubernetes", "--k8s-namespace", "serving",
                 "--prefill-deployment", "llama-prefill", "--decode-deployment", "llama-decode",
                 "--ttft-slo", "0.0001", "--itl-slo", "0.0001", "--planner-interval", "0.5",
                 "--max-prefill-workers", "3", "--max-decode-workers", "3"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while kube.spec != {"llama-prefill": 3, "llama-decode": 3}:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, (kube.patches, log_path.read_text())
                asyncio.run(report_a_busy_fleet(nats.url, "tandem"))
                time.sleep(0.25)
            assert all(n > 1 for _, n in kube.patches), kube.patches  # grown, never shrunk
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log_path.read_text()
        assert "planner: every 0.5 s" in log_path.read_text()


def test_tandem_planner_names_what_the_kubernetes_connector_lacks(capsys):
    from tandem.cli import main as cli

    code = cli.main(["planner", "--nats", "nats://127.0.0.1:1", "--connector", "kubernetes",
                     "--prefill-deployment", "p"])  # fmt: skip
    assert code == 2 and "needs --decode-deployment" in capsys.readouterr().err
    code = cli.main(["planner", "--nats", "nats://127.0.0.1:1", "--connector", "kubernetes",
                     "--workers", "2"])  # fmt: skip
    assert code == 2 and "--workers is for --connector local" in capsys.readouterr().err
    code = cli.main(["planner", "--nats", "nats://127.0.0.1:1", "--workers", "2",
                     "--decode-workers", "1"])  # fmt: skip
    assert code == 2 and "not both" in capsys.readouterr().err
