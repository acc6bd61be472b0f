"""A vLLM general plugin (entry point `vllm.general_plugins`), which vLLM loads in each of
its processes: inside a Tandem worker's vLLM engine, every process vLLM starts dies with its
parent. A worker killed outright (SIGKILL, the OOM killer) gets no chance to shut its engine
down, and vLLM's engine core would live on, holding memory and CPU, beside the worker the
supervisor restarts. Elsewhere (vLLM used on its own) the plugin does nothing."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

#: Set by `VllmEngine` to its own pid; vLLM's processes inherit it.
WORKER_PID = "TANDEM_VLLM_WORKER_PID"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    worker = os.environ.get(WORKER_PID)
    if worker is None or str(os.getpid()) == worker or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the line above: nobody to signal us
        os.kill(os.getpid(), signal.SIGTERM)
