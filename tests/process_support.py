"""A tandem (or vLLM) server as a subprocess for tests: started, its log watched for the line
that says it serves, stopped with SIGTERM (the exit status checked by the caller)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def tandem(*args: str) -> list[str]:
    return [sys.executable, "-m", "tandem.cli.main", *args]


@contextlib.contextmanager
def serving(
    cmd: list[str], log: Path, ready: str, timeout: float = 120, exit_status: int | None = 0
) -> Iterator[subprocess.Popen]:
    """Run `cmd` until `ready` appears in its log (fail with the log if it exits or the time
    runs out), yield it, then SIGTERM it and, unless `exit_status` is None, check it."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            while ready not in log.read_text():
                tail = log.read_text()[-4000:]
                assert proc.poll() is None, f"{cmd[:5]} exited:\n{tail}"
                assert time.monotonic() < deadline, f"{cmd[:5]} not ready:\n{tail}"
                time.sleep(0.2)
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
    if exit_status is not None:
        assert code == exit_status, log.read_text()[-4000:]
