"""`KubernetesScaler`: the planner's connector for pools that are Kubernetes Deployments.

It resizes a pool through its Deployment's scale subresource (what `kubectl scale` and the
HorizontalPodAutoscaler use), with the official `kubernetes` client, and reads the pools
from the Deployments: asked for = `spec.replicas`, serving = `status.readyReplicas`. Scaling
down is Kubernetes' SIGTERM to a pod, on which a Tandem worker drains (its pod's
`terminationGracePeriodSeconds` must cover `--drain-timeout`).

It times start-ups too: from a scale-up to all of that pool's pods ready (the planner plans as
far ahead as the longest recent one). The client is synchronous: its calls run on a worker
thread, off the planner's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

POOLS = ("prefill", "decode")
#: Start-ups remembered: the planner plans as far ahead as the longest of them.
STARTUPS = 8


class KubernetesScaler:
    def __init__(
        self,
        apps: Any,  # kubernetes.client.AppsV1Api
        namespace: str,
        deployments: dict[str, str],  # pool -> Deployment name
        *,
        poll_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        missing = [pool for pool in POOLS if pool not in deployments]
        if missing:
            raise ValueError(f"no Deployment named for the {', '.join(missing)} pool")
        self.apps, self.namespace, self.deployments = apps, namespace, deployments
        self.poll_s = poll_s
        self._asked = dict.fromkeys(POOLS, 0)
        self._ready = dict.fromkeys(POOLS, 0)
        self._read = False  # never act on pools not read yet
        self._clock = clock
        self._grown_at: dict[str, float] = {}  # pool -> when it was last scaled up
        self.startups: deque[float] = deque(maxlen=STARTUPS)  # ask to all ready, seconds

    @classmethod
    def connect(cls, namespace: str, deployments: dict[str, str], **kw: Any) -> KubernetesScaler:
        """With the in-cluster service account, else the local kubeconfig."""
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.AppsV1Api(), namespace, deployments, **kw)

    def replicas(self) -> tuple[int, int]:
        if not self._read:
            raise RuntimeError("the Deployments have not been read yet: no decision")
        return self._asked["prefill"], self._asked["decode"]

    def starting(self) -> tuple[int, int]:
        prefill, decode = (max(0, self._asked[p] - self._ready[p]) for p in POOLS)
        return prefill, decode

    def measured_startup(self) -> float | None:
        """The longest recent time from a scale-up to all of the pool's pods ready."""
        return max(self.startups, default=None)

    async def scale(self, prefill: int, decode: int) -> None:
        for pool, n in zip(POOLS, (prefill, decode), strict=True):
            if n != self._asked[pool]:
                body = {"spec": {"replicas": n}}
                await asyncio.to_thread(self.apps.patch_namespaced_deployment_scale,
                                        self.deployments[pool], self.namespace, body)  # fmt: skip
                log.info("deployment %s/%s (%s): %d -> %d replicas", self.namespace,
                         self.deployments[pool], pool, self._asked[pool], n)  # fmt: skip
                if n > self._asked[pool]:
                    self._grown_at.setdefault(pool, self._clock())
                else:
                    self._grown_at.pop(pool, None)  # no start to time any more
                self._asked[pool] = n

    async def refresh(self) -> None:
        """Read both Deployments: replicas asked for and ready."""
        for pool in POOLS:
            found = await asyncio.to_thread(self.apps.read_namespaced_deployment,
                                            self.deployments[pool], self.namespace)  # fmt: skip
            self._asked[pool] = found.spec.replicas or 0
            self._ready[pool] = (found.status.ready_replicas or 0) if found.status else 0
            if pool in self._grown_at and self._ready[pool] >= self._asked[pool]:
                self.startups.append(self._clock() - self._grown_at.pop(pool))
        self._read = True

    async def follow(self, discovery: Any = None, namespace: str = "") -> None:
        """Keep the pools current from the API server, until cancelled (a failed read is
        logged and tried again: the API server may be restarting)."""
        while True:
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("could not read the Deployments: %s", exc)
            await asyncio.sleep(self.poll_s)
