"""A linear layer for decode batches of a few rows, in Triton.

At batch 1..16 `x @ W.T` is a read of W: its time is W's bytes over the memory bandwidth.
cuBLAS reaches ~60-75 % of the copy bandwidth on the small projections of an 8B model
(o_proj, qkv) and splits K with a separate reduce kernel. Here each program owns `BLOCK_N`
output features and walks all of K in `BLOCK_K` steps, pipelined, so no reduce is needed and
hundreds of programs keep every SM streaming; the few rows of x ride along in one padded
tensor-core tile of 16 to 64 rows.
"""

from __future__ import annotations

import torch

from tandem.engine.kernels.pdl import launch_options, pdl_prologue

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: `linear` falls back to torch
    triton = None

#: Rows up to which the engine sends a linear to the skinny kernel.
MAX_ROWS = 16
#: Rows one launch can hold: x rides in one tile of the next power of two >= 16 rows.
TILE_ROWS = 64


def _skinny_linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, s_xm, s_wn, s_om,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_prologue(PDL)
    n0 = tl.program_id(0) * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        x = tl.load(
            x_ptr + offs_m[:, None] * s_xm + (k0 + offs_k)[None, :],
            mask=m_ok[:, None] & k_ok[None, :], other=0.0,
        )  # fmt: skip
        w = tl.load(
            w_ptr + offs_n[:, None].to(tl.int64) * s_wn + (k0 + offs_k)[None, :],
            mask=n_ok[:, None] & k_ok[None, :], other=0.0,
        )  # fmt: skip
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    dst = out_ptr + offs_m[:, None] * s_om + offs_n[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


if triton is not None:
    _skinny_linear_kernel = triton.jit(_skinny_linear_kernel)


def tile_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(block_n, block_k, num_warps, num_stages) for an [n, k] weight. Measured on an H200
    (benchmarks/linear_shapes.py): wide layers stream best in 64-feature tiles, narrow
    ones (o_proj, down) want fewer features and longer K steps so every SM stays busy."""
    if n >= 16384:
        return 64, 256, 4, 3
    if n > k:
        return 64, 128, 4, 5
    return 32, 512, 4, 5


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """`x @ weight.T (+ bias)` for `x` of at most `TILE_ROWS` rows, contiguous in K; half or
    bfloat16. The grid depends on shapes only (CUDA-graph safe)."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= TILE_ROWS and weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_n, block_k, num_warps, num_stages = config or tile_config(n, k)
    _skinny_linear_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=max(16, triton.next_power_of_2(m)),
        HAS_BIAS=bias is not None,
        num_warps=num_warps, num_stages=num_stages, **launch_options(x),
    )  # fmt: skip
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, through the skinny kernel where it applies: a CUDA batch of few rows."""
    few_rows = x.dim() == 2 and x.shape[0] <= MAX_ROWS
    if triton is not None and x.is_cuda and few_rows and x.dtype != torch.float32:
        return skinny_linear(x if x.stride(1) == 1 else x.contiguous(), weight, bias=bias)
    return torch.nn.functional.linear(x, weight, bias)
