"""NIXL: the decode worker READs the blocks it lacks straight out of the prefill worker's cache
into the blocks it reserved, through NIXL's UCX back end (shared memory or TCP on a CPU
host, RDMA or NVLink where present). No staging on either side and no Python on the
prefill side: its agent registered its caches once and its card carries the agent's
metadata.

Descriptors follow the cache layout (`[layers, blocks, ...]` for K and for V): one per
layer-block, prepared once per cache; a pull selects `2 x layers x blocks` of them by index,
and NIXL merges the runs that are contiguous on both sides. Confirmation and release go over
the request plane as for TCP (`kv_touch` before and after the read, `kv_release` after).

Install with `pip install -e '.[nixl]'` (the `nixl-cu12` wheel, which carries UCX; `nixl-cu13`
works too).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import threading
import time
import types
import uuid
from collections import Counter, OrderedDict
from typing import Any

import numpy as np
import torch

from tandem.protocol import KvLayout, KvTransferParams
from tandem.protocol.transfer import NixlCache
from tandem.transfer.blocks import check_layout

log = logging.getLogger(__name__)

#: NIXL's Python API ships as `nixl` (meta package) or as one of its CUDA builds.
MODULES = ("nixl._api", "nixl_cu13._api", "nixl_cu12._api")
#: UCX worker threads per agent: they share out the descriptors of a read. Against two, four
#: moved scattered blocks 1.2-1.5x faster on this 2-core machine (kv_transfer.py, paired runs),
#: contiguous ones about the same; they idle between transfers.
THREADS = 4
#: Peers whose descriptor lists are kept prepared; the least recently read from goes first.
MAX_PEERS = 8
#: Seconds a cancelled read may take to end before the worker stops waiting for it.
ABORT_WAIT_S = 10.0
#: The longest NIXL's UCX progress thread sleeps between polls, in microseconds (NIXL rounds
#: it up to whole milliseconds; UCX's events wake it sooner). NIXL's Python API sets 0, with
#: which the thread never sleeps and keeps a core busy for as long as the agent lives.
PROGRESS_POLL_US = 1000
_building = threading.Lock()


class NixlError(RuntimeError):
    """A NIXL transfer failed or NIXL is unusable here."""


def nixl_api() -> Any | None:
    """NIXL's `_api` module, or None when no NIXL wheel is installed."""
    for name in MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _descs(k: int, v: int, layout: KvLayout, num_blocks: int, device: int) -> np.ndarray:
    """(address, bytes, device) of every layer-block of K then V, in index order
    `(kv * layers + layer) * num_blocks + block`."""
    size = layout.layer_block_bytes
    per_cache = np.arange(layout.num_layers * num_blocks, dtype=np.int64) * size
    addrs = np.concatenate([k + per_cache, v + per_cache])
    out = np.empty((len(addrs), 3), dtype=np.int64)
    out[:, 0], out[:, 1], out[:, 2] = addrs, size, device
    return out


def _fits(blocks: list[int], num_blocks: int) -> bool:
    """Every id a block of a cache of `num_blocks` (another would address another layer)."""
    return min(blocks) >= 0 and max(blocks) < num_blocks


def _indices(blocks: list[int], layers: int, num_blocks: int) -> np.ndarray:
    rows = np.arange(2 * layers, dtype=np.int64)[:, None] * num_blocks
    return (rows + np.asarray(blocks, dtype=np.int64)[None, :]).reshape(-1).astype(np.int32)


def _new_agent(api: Any, name: str) -> Any:
    """`api.nixl_agent(name, ...)` whose progress thread sleeps between polls. The API takes
    no such setting, so its bindings module is swapped, for this call only, for one whose
    agent config keeps `pthrDelay` at least PROGRESS_POLL_US."""
    bindings = api.nixlBind

    class PollingConfig(bindings.nixlAgentConfig):
        def __setattr__(self, field: str, value: Any) -> None:
            if field == "pthrDelay":
                value = max(value, PROGRESS_POLL_US)
            super().__setattr__(field, value)

    names = {n: getattr(bindings, n) for n in dir(bindings) if not n.startswith("__")}
    config = api.nixl_agent_config(backends=["UCX"], num_threads=THREADS)
    with _building:
        api.nixlBind = types.SimpleNamespace(**names | {"nixlAgentConfig": PollingConfig})
        try:
            return api.nixl_agent(name, config)
        finally:
            api.nixlBind = bindings


class NixlAgent:
    """One worker's NIXL agent over its own K and V caches: what peers read (`cache`, for
    the card) and where this worker's reads land."""

    def __init__(
        self, k: torch.Tensor, v: torch.Tensor, layout: KvLayout, loopback: bool = True
    ) -> None:
        """`loopback`: the worker serves only this machine, so UCX listens on 127.0.0.1 alone
        (by default it listens on every interface); a UCX_NET_DEVICES set by the user wins."""
        api = nixl_api()
        if api is None:
            raise NixlError("NIXL is not installed (pip install -e '.[nixl]')")
        if loopback:
            os.environ.setdefault("UCX_NET_DEVICES", "lo")
        self.layout = layout
        self.num_blocks = k.shape[1]
        mem_type = "VRAM" if k.is_cuda else "DRAM"
        device = (k.device.index or 0) if k.is_cuda else 0
        name = f"tandem-{uuid.uuid4().hex[:16]}"
        self.agent = _new_agent(api, name)
        if "UCX" not in self.agent.backends:
            raise NixlError("NIXL's UCX back end did not start (see NIXL's log above)")
        self.agent.register_memory([k, v])
        descs = _descs(k.data_ptr(), v.data_ptr(), layout, self.num_blocks, device)
        self._local = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", descs, mem_type)
        self.cache = NixlCache(agent=name, metadata=self.agent.get_agent_metadata(),
                               mem_type=mem_type, device=device, k_addr=k.data_ptr(),
                               v_addr=v.data_ptr(), num_blocks=self.num_blocks)  # fmt: skip
        self._caches = (k, v)  # registered memory must outlive the agent's use of it
        self._peers: OrderedDict[NixlCache, Any] = OrderedDict()
        self._reading: Counter[NixlCache] = Counter()  # reads in flight per peer

    def _remote(self, peer: NixlCache) -> Any:
        """The prepared descriptor list of a peer's caches (its agent added once)."""
        prepped = self._peers.get(peer)
        if prepped is None:
            name = self.agent.add_remote_agent(peer.metadata)
            descs = _descs(peer.k_addr, peer.v_addr, self.layout, peer.num_blocks, peer.device)
            prepped = self.agent.prep_xfer_dlist(name, descs, peer.mem_type)
            self._peers[peer] = prepped
            log.info("reading KV blocks through NIXL from agent %s", peer.agent)
        self._peers.move_to_end(peer)
        idle = [p for p in self._peers if not self._reading[p] and p != peer]
        for gone in idle[: max(0, len(self._peers) - MAX_PEERS)]:  # never one being read
            self.agent.release_dlist_handle(self._peers.pop(gone))
            self.agent.remove_remote_agent(gone.agent)
        return prepped

    async def read(self, peer: NixlCache, src: list[int], dst: list[int]) -> None:
        """Copy blocks `src` of `peer`'s caches into blocks `dst` of ours (every layer, K and
        V). Cancelled, it returns only once NIXL no longer writes into `dst`."""
        if not src:
            return
        fits = _fits(src, peer.num_blocks) and _fits(dst, self.num_blocks)
        if len(src) != len(dst) or not fits:
            raise ValueError(f"blocks {src} of agent {peer.agent} cannot go to blocks {dst}")
        layers = self.layout.num_layers
        handle = self.agent.make_prepped_xfer(
            "READ",
            self._local,
            _indices(dst, layers, self.num_blocks),
            self._remote(peer),
            _indices(src, layers, peer.num_blocks),
        )
        state = "ERR"
        self._reading[peer] += 1
        try:
            state = self.agent.transfer(handle)
            delay = 0.0002
            while state == "PROC":
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.002)
                state = self.agent.check_xfer_state(handle)
            if state != "DONE":
                raise NixlError(f"NIXL read from agent {peer.agent} ended in state {state}")
        finally:
            self._end(handle, state)
            self._reading[peer] -= 1

    def _end(self, handle: Any, state: str) -> None:
        """Release a transfer; one still running (a cancelled read) is waited for first, as
        the blocks it writes are about to be handed to another request."""
        deadline = time.monotonic() + ABORT_WAIT_S
        while state == "PROC" and time.monotonic() < deadline:
            time.sleep(0.001)
            state = self.agent.check_xfer_state(handle)
        if state == "PROC":
            log.error("a NIXL read did not end within %.0f s of being abandoned", ABORT_WAIT_S)
        self.agent.release_xfer_handle(handle)


class NixlKvSource:
    """The decode side: NIXL reads from prefill workers that offer them (`params.nixl`);
    others, and every touch and release, go to `fallback` (a TcpKvSource)."""

    def __init__(self, agent: NixlAgent, fallback: Any) -> None:
        self.agent = agent
        self.fallback = fallback
        self.layout = fallback.layout
        self.nixl_fetches = 0

    async def fetch(self, params: KvTransferParams, indices: list[int], dst: list[int]) -> None:
        if params.nixl is None:
            return await self.fallback.fetch(params, indices, dst)
        check_layout(self.layout, params.layout, f"worker {params.worker_id}")
        await self.fallback.confirm_held(params)
        await self.agent.read(params.nixl, [params.block_ids[i] for i in indices], dst)
        # Still held after the read: nothing reused the blocks while they were copied.
        await self.fallback.confirm_held(params)
        self.nixl_fetches += 1
        return None  # the blocks are in place

    async def confirm_held(self, params: KvTransferParams) -> None:
        await self.fallback.confirm_held(params)

    async def release(self, params: KvTransferParams) -> None:
        await self.fallback.release(params)
