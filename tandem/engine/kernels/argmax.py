"""Row-wise argmax over a vocabulary, in two Triton launches.

torch reduces each row of `logits.argmax(-1)` in one thread block, so at decode batch 1 a
128k-token vocabulary is read by one SM: 28 us of a 4.6 ms step on an H200 (the profile of
`benchmarks/engine_gpu.py`). Here a program per (row, chunk) finds its chunk's maximum, and a
program per row picks the best chunk. Ties go to the lowest index, as torch's do.
"""

from __future__ import annotations

import torch

from tandem.engine.kernels.pdl import launch_options, pdl_prologue

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: torch's argmax serves
    triton = None

#: Vocabulary entries per program of the first pass.
CHUNK = 4096


def _chunk_max_kernel(
    x_ptr, val_ptr, idx_ptr, n, s_x, num_chunks, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    pdl_prologue(PDL)
    row, chunk = tl.program_id(0), tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row.to(tl.int64) * s_x + offs, mask=offs < n, other=float("-inf"))
    best, at = tl.max(x.to(tl.float32), 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(val_ptr + row * num_chunks + chunk, best)
    tl.store(idx_ptr + row * num_chunks + chunk, chunk * BLOCK + at)


def _best_chunk_kernel(val_ptr, idx_ptr, out_ptr, num_chunks, BLOCK: tl.constexpr,
                       PDL: tl.constexpr):  # fmt: skip
    pdl_prologue(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < num_chunks
    vals = tl.load(val_ptr + row * num_chunks + offs, mask=ok, other=float("-inf"))
    _, at = tl.max(vals, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(out_ptr + row, tl.load(idx_ptr + row * num_chunks + at).to(tl.int64))


if triton is not None:
    _chunk_max_kernel = triton.jit(_chunk_max_kernel)
    _best_chunk_kernel = triton.jit(_best_chunk_kernel)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` for a [rows, n] CUDA tensor, int64; other tensors go to torch."""
    if triton is None or not x.is_cuda or x.dim() != 2 or x.shape[1] <= CHUNK or not len(x):
        return x.argmax(dim=-1)
    return two_pass_argmax(x)


def two_pass_argmax(x: torch.Tensor) -> torch.Tensor:
    """The kernels' path, on any device Triton runs on (the interpreter's too)."""
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, n = x.shape
    num_chunks = triton.cdiv(n, CHUNK)
    vals = torch.empty(rows, num_chunks, dtype=torch.float32, device=x.device)
    idx = torch.empty(rows, num_chunks, dtype=torch.int32, device=x.device)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    pdl = launch_options(x)
    _chunk_max_kernel[(rows, num_chunks)](x, vals, idx, n, x.stride(0), num_chunks, BLOCK=CHUNK,
                                          **pdl)  # fmt: skip
    block = triton.next_power_of_2(num_chunks)
    _best_chunk_kernel[(rows,)](vals, idx, out, num_chunks, BLOCK=block, **pdl)
    return out
