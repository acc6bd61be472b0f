"""Blocks copied from another engine's cache, and the layout check that every transport runs
before moving a byte."""

from __future__ import annotations

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
