"""`tandem serve --api-server-count 2`: two frontend processes share one port (SO_REUSEPORT),
each with its own router fed by the same KV events over a real nats-server, so both route a
repeated prompt to the worker that holds its prefix."""

from __future__ import annotations

import re
import time

import httpx
from nats_support import needs_nats
from test_distributed_serve import Cluster

pytestmark = needs_nats

COUNTERS = ("decisions", "request_blocks", "overlap_blocks")


def router_counters(base: str) -> tuple[float, ...]:
    """One frontend's (decisions, request blocks, overlap blocks), over a fresh connection so
    that the kernel may hand it to either process."""
    text = httpx.get(f"{base}/metrics", headers={"Connection": "close"}, timeout=5).text
    values = []
    for name in COUNTERS:
        match = re.search(rf"^tandem_router_{name}_total(?:{{[^}}]*}})? (\S+)$", text, re.M)
        assert match, f"tandem_router_{name}_total missing"
        values.append(float(match.group(1)))
    return tuple(values)


def index_blocks(base: str) -> float:
    text = httpx.get(f"{base}/metrics", headers={"Connection": "close"}, timeout=5).text
    match = re.search(r"^tandem_router_index_blocks (\S+)$", text, re.M)
    assert match, "tandem_router_index_blocks missing"
    return float(match.group(1))


def test_two_frontends_share_a_port_and_route_alike(tmp_path):
    cluster = Cluster(tmp_path, "--router-mode", "kv", "--api-server-count", "2")
    try:
        cluster.wait_for_workers(2, timeout=180)
        deadline = time.monotonic() + 60
        # Both frontends up (and subscribed to the KV events) before anything is cached.
        while cluster.log().count("serving 'tiny' at") < 2:
            assert time.monotonic() < deadline, cluster.log()
            time.sleep(0.2)
        prompt = " ".join(f"word{i}" for i in range(40))
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 2}

        def complete() -> None:
            reply = httpx.post(f"{cluster.base}/v1/completions", json=body, timeout=60,
                               headers={"Connection": "close"})  # fmt: skip
            assert reply.status_code == 200, reply.text

        complete()  # its prefix is now cached on one worker, and both routers hear of it
        while not all(index_blocks(cluster.base) > 0 for _ in range(20)):
            assert time.monotonic() < deadline, "the KV events never reached both routers"
            time.sleep(0.2)
        repeats = 12
        for _ in range(repeats):
            # Apart by more than the workers' 0.1 s load reports: a router counts the load a
            # request it routed put on its worker until that worker's next report, and so
            # may send a repeat sent at once elsewhere.
            time.sleep(0.3)
            complete()
        seen = {router_counters(cluster.base) for _ in range(40)}
        assert len(seen) == 2, f"expected two frontends' counters, got {seen}"
        decisions, request_blocks, overlap = (sum(c[i] for c in seen) for i in range(3))
        assert decisions == repeats + 1 and all(c[0] > 0 for c in seen), seen
        blocks = request_blocks / (repeats + 1)
        assert blocks >= 4
        # Every repeat, whichever frontend took it, went to the worker holding the prefix.
        assert overlap >= repeats * (blocks - 1), seen
    finally:
        cluster.close()
