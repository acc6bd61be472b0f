"""How a prefill or decode worker moves KV blocks (`--kv-transport`), decided once at start.

`auto` takes every transport that can work here, best first: CUDA IPC between GPUs of one
node, NIXL when it is installed (for GPU caches only where an RDMA device is present: without
one UCX stages GPU memory through TCP, 0.45-0.57 GB/s on an H100 host against 1.3-1.9 for
Tandem's own TCP path), TCP always. A named one is that transport alone, and is
refused at start where it cannot work. The card lists the result, so a frontend refuses a
pair with none in common when the second worker registers, not when a request fails.

A decode worker's source tries them in order: CUDA IPC for a prefill worker on its node, NIXL
for one whose card offers it, TCP otherwise (and for every touch and release).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import msgspec

from tandem.protocol.transfer import CudaIpcCache
from tandem.protocol.worker import ModelCard
from tandem.transfer.nixl import NixlAgent, NixlKvSource, nixl_api
from tandem.transfer.tcp import TcpKvSource
from tandem.worker.kv_peers import ipc_digest

log = logging.getLogger(__name__)

KV_TRANSPORTS = ("auto", "nixl", "tcp", "cuda-ipc")


@dataclass
class KvTransport:
    """One worker's transports: what its card says, what a prefill worker hands out with each
    export, and (decode role) the source it pulls with."""

    names: list[str]
    cuda_ipc: CudaIpcCache | None = None
    nixl: NixlAgent | None = None
    source: Any = None

    def card(self, card: ModelCard) -> ModelCard:
        """`card` saying how this worker moves KV (its CUDA IPC handles by digest)."""
        cache = self.nixl.cache if self.nixl is not None else None
        digest = ipc_digest(self.cuda_ipc) if self.cuda_ipc is not None else ""
        return msgspec.structs.replace(card, kv_transports=self.names, kv_nixl=cache,
                                       kv_ipc_digest=digest)  # fmt: skip


def transport_names(choice: str, engine: Any) -> list[str]:
    """The transports `choice` means for `engine`; ValueError if it cannot work here (the
    worker then exits with a configuration error)."""
    if choice not in KV_TRANSPORTS:
        raise ValueError(f"--kv-transport {choice!r}: choose one of {', '.join(KV_TRANSPORTS)}")
    caches = engine.kv_caches() if hasattr(engine, "kv_caches") else None
    if caches is None:  # the mock's transfers are modelled; vLLM's move through its connector
        if choice not in ("auto", "tcp"):
            raise ValueError(
                f"--kv-transport {choice} needs a KV cache that Tandem moves; this engine"
                " (mock, or vLLM) has none"
            )
        return ["tcp"]
    gpu = caches[0].is_cuda
    if choice == "auto":
        nixl = nixl_api() is not None and (not gpu or bool(rdma_devices()))
        return (["cuda-ipc"] if gpu else []) + (["nixl"] if nixl else []) + ["tcp"]
    if choice == "cuda-ipc" and not gpu:
        raise ValueError("--kv-transport cuda-ipc needs the KV cache on a GPU (--device cuda)")
    if choice == "nixl" and nixl_api() is None:
        raise ValueError("--kv-transport nixl: NIXL is not installed (pip install -e '.[nixl]')")
    return [choice]


def rdma_devices(root: str = "/sys/class/infiniband") -> list[str]:
    """The RDMA devices (InfiniBand, RoCE, EFA) the kernel lists here."""
    try:
        return sorted(os.listdir(root))
    except OSError:
        return []


def open_kv_transport(
    engine: Any, role: str, choice: str, client: Any, loopback: bool = True
) -> KvTransport:
    """Set up `choice` for a worker of `role` on `engine` (`client`: the decode side's
    request-plane client, for TCP pulls, touches and releases; `loopback`: the worker serves
    127.0.0.1 only, and so does its NIXL agent)."""
    names = transport_names(choice, engine)
    if role not in ("prefill", "decode") or getattr(engine, "kv_connector", ""):
        return KvTransport(names)  # moves no KV, or its engine moves it
    caches = engine.kv_caches()
    kv = KvTransport(names)
    if "nixl" in names:  # as "cuda-ipc", only named for an engine with caches
        try:
            kv.nixl = NixlAgent(*caches, engine.kv_layout, loopback)
        except Exception as exc:  # e.g. a UCX without the GPU's memory type
            if choice != "auto":
                raise
            log.warning("NIXL cannot serve this KV cache (%s: %s); moving KV without it",
                        type(exc).__name__, exc)  # fmt: skip
            kv.names = [n for n in names if n != "nixl"]
        else:
            log.info("KV transfer through NIXL (agent %s)", kv.nixl.cache.agent)
    if role == "prefill":
        if "cuda-ipc" in names:
            from tandem.transfer.cuda_ipc import share_cache

            kv.cuda_ipc = share_cache(*caches)
        return kv
    source: Any = TcpKvSource(client, engine.kv_layout, engine.kv_caches)
    if kv.nixl is not None:
        source = NixlKvSource(kv.nixl, source)
    if "cuda-ipc" in names:
        from tandem.transfer.cuda_ipc import CudaIpcKvSource

        source = CudaIpcKvSource(source)
    kv.source = source
    return kv
