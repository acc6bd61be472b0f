"""Helpers for tests and benchmarks that drive real processes: finding a `tandem serve`'s
children, waiting for its health, and a request-plane token server in a child process.
(The bundled nats-server lives in `tandem.deploy.processes`.)
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path


def child_pids(proc: subprocess.Popen, subcommand: str) -> list[int]:
    """The children of a `tandem serve` that run `tandem SUBCOMMAND` (worker, frontend)."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    marker = f"\0{subcommand}\0".encode()
    return [int(p) for p in children if marker in Path(f"/proc/{p}/cmdline").read_bytes()]


def wait_for_health(
    proc: subprocess.Popen,
    base_url: str,
    log_path: Path,
    timeout: float = 120.0,
    ready: Callable[[dict], bool] = lambda body: True,
) -> dict:
    """Poll a `tandem serve`'s /health until it answers 200 and `ready(body)`; its body.
    RuntimeError, with the server's log, if the process exits or `timeout` passes first."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready in {timeout:.0f} s:\n{log_path.read_text()}")
        try:
            reply = httpx.get(f"{base_url}/health", timeout=2)
            if reply.status_code == 200 and ready(reply.json()):
                return reply.json()
        except httpx.TransportError:
            pass
        time.sleep(0.3)


# ---- a request-plane server in a child process (peer-death tests, benchmarks) ---------------


async def _serve_tokens(delay: float, host: str, nats_url: str | None, ttl: float) -> None:
    import asyncio

    from tandem.runtime.addressing import new_instance_id
    from tandem.runtime.messages import InstanceInfo
    from tandem.runtime.tcp_server import TcpRequestServer

    server = TcpRequestServer(host)

    async def tokens(request: dict) -> AsyncIterator[int]:
        for i in range(int(request.get("n", 1 << 62))):
            if delay:
                await asyncio.sleep(delay)
            yield i

    server.add_endpoint("tokens", tokens)
    await server.start()
    instance_id = new_instance_id()
    if nats_url:
        from tandem.runtime.nats_discovery import NatsDiscovery

        discovery = await NatsDiscovery.connect(nats_url, default_ttl=ttl)
        await discovery.register(
            InstanceInfo(
                namespace="test",
                component="tokens",
                endpoint="tokens",
                instance_id=instance_id,
                address=server.address,
            )
        )
    print(server.address, instance_id, flush=True)
    await asyncio.Event().wait()


def spawn_token_server(
    delay: float = 0.0, nats_url: str | None = None, ttl: float = 1.0
) -> tuple[subprocess.Popen[str], str, str]:
    """Start `python -m tandem.runtime.testing`: a TcpRequestServer whose `tokens` endpoint
    streams `n` integers `delay` seconds apart, registered as `test.tokens.tokens` in NATS
    discovery if `nats_url` is given. Returns the process, its address and its instance id."""
    import sys

    cmd = [sys.executable, "-m", "tandem.runtime.testing", "--delay", str(delay), "--ttl", str(ttl)]
    if nats_url:
        cmd += ["--nats", nats_url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != 2:
        proc.kill()
        proc.wait()
        raise RuntimeError("token server did not start")
    return proc, line[0], line[1]


if __name__ == "__main__":
    import argparse
    import asyncio

    parser = argparse.ArgumentParser(description="a request-plane token server for tests")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--nats", default=None, help="register in NATS discovery at this URL")
    parser.add_argument("--ttl", type=float, default=1.0, help="lease TTL when registering")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_tokens(args.delay, args.host, args.nats, args.ttl))
