"""CUDA IPC between two processes on one GPU: a child shares its K and V caches, this process
maps them and copies blocks device to device. Needs a CUDA GPU (skipped elsewhere)."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest
import torch

from tandem.protocol.transfer import CudaIpcCache
from tandem.transfer.blocks import CacheBlocks
from tandem.transfer.cuda_ipc import local_device, open_cache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPE = (4, 32, 16, 2, 64)  # layers, blocks, block_size, kv_heads, head_dim

CHILD = f"""
import sys, msgspec, torch
from tandem.transfer.cuda_ipc import share_cache
n = 1
for d in {SHAPE!r}:
    n *= d
k = torch.arange(n, device="cuda", dtype=torch.float32).view({SHAPE!r}).to(torch.bfloat16)
v = (-k).contiguous()
print(msgspec.json.encode(share_cache(k, v)).decode(), flush=True)
sys.stdin.read()  # keep the memory alive until the parent is done
"""


def expected(block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    n = 1
    for d in SHAPE:
        n *= d
    k = torch.arange(n, dtype=torch.float32).view(SHAPE).to(torch.bfloat16)
    return k[:, block_ids], (-k)[:, block_ids]


def test_blocks_copy_from_another_process_cache():
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        cache = msgspec.json.decode(child.stdout.readline(), type=CudaIpcCache)
        device = local_device(cache)
        assert device is not None
        k_src, v_src = open_cache(cache, torch.bfloat16, device)
        k_dst = torch.zeros(SHAPE, dtype=torch.bfloat16, device=f"cuda:{device}")
        v_dst = torch.zeros_like(k_dst)
        src, dst = [3, 17, 5, 31], [0, 1, 2, 3]
        CacheBlocks(k_src, v_src, src).write_into(k_dst, v_dst, dst)
        want_k, want_v = expected(src)
        assert torch.equal(k_dst[:, dst].cpu(), want_k)
        assert torch.equal(v_dst[:, dst].cpu(), want_v)
        assert not k_dst[:, 4:].any()
    finally:
        child.stdin.close()
        child.wait(30)
