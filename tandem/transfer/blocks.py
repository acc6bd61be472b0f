"""Blocks copied from another engine's cache, and the layout check that every transport runs
before moving a byte."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tandem.protocol import KvLayout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class KvLayoutMismatch(ValueError):
    """Two workers whose KV caches differ in geometry or dtype cannot exchange blocks."""


def check_layout(local: KvLayout, remote: KvLayout, remote_name: str = "the source") -> None:
    """Raise KvLayoutMismatch, naming what differs, unless blocks of `remote` fit `local`."""
    reason = local.mismatch(remote)
    if reason is not None:
        raise KvLayoutMismatch(f"{remote_name} cannot send KV blocks to this worker: {reason}")


def _index(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


class CacheBlocks:
    """Blocks still in another engine's cache (same process, or mapped through CUDA IPC):
    copied straight from there, device to device when both are GPUs."""

    def __init__(self, k_src: torch.Tensor, v_src: torch.Tensor, src: list[int]) -> None:
        self.k_src = k_src
        self.v_src = v_src
        self.src = src

    def write_into(self, k_cache: torch.Tensor, v_cache: torch.Tensor, dst: list[int]) -> None:
        src = _index(self.src, self.k_src.device)
        idx = _index(dst, k_cache.device)
        k_cache.index_copy_(1, idx, self.k_src.index_select(1, src).to(k_cache.device))
        v_cache.index_copy_(1, idx, self.v_src.index_select(1, src).to(v_cache.device))
        if k_cache.is_cuda:
            torch.cuda.current_stream(k_cache.device).synchronize()  # before the source frees


def _byte_rows(layer_cache: torch.Tensor) -> np.ndarray:
    """A CPU layer cache `[blocks, ...]` as `[blocks, bytes]` uint8 over the same memory:
    numpy's fancy indexing moves scattered blocks ~6x faster than `index_copy_` here."""
    return layer_cache.view(torch.uint8).reshape(layer_cache.shape[0], -1).numpy()


def read_blocks(layer_cache: torch.Tensor, ids: np.ndarray) -> memoryview:
    """The bytes of blocks `ids` of one layer's cache, in that order, in host memory."""
    if layer_cache.is_cuda:
        index = torch.from_numpy(ids).to(layer_cache.device)
        rows = layer_cache.index_select(0, index).cpu().view(torch.uint8).numpy()
    else:
        rows = _byte_rows(layer_cache)[ids]
    return memoryview(rows).cast("B")


def write_blocks(layer_cache: torch.Tensor, ids: np.ndarray, raw: Any) -> None:
    """Copy `raw` (blocks in the cache's dtype) into blocks `ids` of one layer's cache; a
    buffer of the wrong size is refused."""
    block_bytes = layer_cache[0].numel() * layer_cache.element_size()
    if len(raw) != len(ids) * block_bytes:
        raise ValueError(f"{len(raw)} bytes of KV for {len(ids) * block_bytes} bytes of blocks")
    src = np.frombuffer(raw, dtype=np.uint8).reshape(len(ids), block_bytes)
    if not layer_cache.is_cuda:
        _byte_rows(layer_cache)[ids] = src
        return
    rows = torch.from_numpy(src.copy()).view(layer_cache.dtype).view(-1, *layer_cache.shape[1:])
    index = torch.from_numpy(ids).to(layer_cache.device)
    layer_cache.index_copy_(0, index, rows.to(layer_cache.device))
