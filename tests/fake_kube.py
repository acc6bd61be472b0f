"""A small fake Kubernetes API server for the planner's connector: the two calls it makes
(read a Deployment, patch its scale subresource), served over real HTTP on 127.0.0.1 so the
official `kubernetes` client runs unchanged against it. No cluster runs here."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tandem.deploy.processes import free_port

PREFIX = "/apis/apps/v1/namespaces/{namespace}/deployments/{name}"


class FakeKube:
    """Deployments of one namespace: `spec` replicas asked for, `ready` ones (a test moves
    them), and every scale patch received."""

    def __init__(self, namespace: str, replicas: dict[str, int]) -> None:
        self.namespace = namespace
        self.spec = dict(replicas)
        self.ready = dict(replicas)
        self.patches: list[tuple[str, int]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="error")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> FakeKube:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert time.monotonic() < deadline, "the fake API server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
            f"clusters:\n- name: fake\n  cluster:\n    server: {self.url}\n"
            "contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n"
            "users:\n- name: fake\n  user:\n    token: fake-token\n"
        )
        return path

    def _missing(self, namespace: str, name: str) -> JSONResponse | None:
        if namespace == self.namespace and name in self.spec:
            return None
        message = f'deployments.apps "{name}" not found'
        status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                  "reason": "NotFound", "message": message}  # fmt: skip
        return JSONResponse(status, status_code=404)

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get(PREFIX)
        async def read(namespace: str, name: str) -> Any:
            return self._missing(namespace, name) or deployment(
                namespace, name, self.spec[name], self.ready[name]
            )

        @app.patch(PREFIX + "/scale")
        async def scale(namespace: str, name: str, request: Request) -> Any:
            if (missing := self._missing(namespace, name)) is not None:
                return missing
            replicas = int((await request.json())["spec"]["replicas"])
            self.spec[name] = replicas
            self.patches.append((name, replicas))
            meta = {"name": name, "namespace": namespace}
            status = {"replicas": self.ready[name]}
            return {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": meta,
                    "spec": {"replicas": replicas}, "status": status}  # fmt: skip

        return app


def deployment(namespace: str, name: str, replicas: int, ready: int) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas, "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels},
                         "spec": {"containers": [{"name": "worker", "image": "tandem"}]}},
        },
        "status": {"replicas": replicas, "readyReplicas": ready},
    }  # fmt: skip
