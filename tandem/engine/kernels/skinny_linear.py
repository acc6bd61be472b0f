"""A linear layer for decode batches of a few rows, in Triton.

At batch 1..16 `x @ W.T` is a read of W: its time is W's bytes over the memory bandwidth.
cuBLAS reaches ~60-75 % of the copy bandwidth on the small projections of an 8B model
(o_proj, qkv) and splits K with a separate reduce kernel. Here each program owns `BLOCK_N`
output features and walks all of K in `BLOCK_K` steps, pipelined, so no reduce is needed and
hundreds of programs keep every SM streaming; the few rows of x ride along in one padded
tensor-core tile of 16 to 64 rows. Narrow layers at 17-64 rows split K after all: their
parts go to the residual add that follows (o_proj, down) or are summed by the last split
of each tile to finish (qkv), never by a kernel of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

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
#: Output features from which a layer is wide (gate/up, lm_head): its own tiles, and cuBLAS
#: past `MAX_ROWS` rows, where it already fills the GPU.
WIDE = 16384


def _skinny_linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, parts_ptr, count_ptr, M, N, K, K_PER_SPLIT, s_xm, s_wn,
    s_om, s_os,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, GATED: tl.constexpr, SUMMED: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_prologue(PDL)
    n0 = tl.program_id(0) * BLOCK_N
    split = tl.program_id(1)
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # GATED: the up half's features
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = (k0 + offs_k) < k_hi
        x = tl.load(
            x_ptr + offs_m[:, None] * s_xm + (k0 + offs_k)[None, :],
            mask=m_ok[:, None] & k_ok[None, :], other=0.0,
        )  # fmt: skip
        w = tl.load(
            w_ptr + offs_n[:, None].to(tl.int64) * s_wn + (k0 + offs_k)[None, :],
            mask=n_ok[:, None] & k_ok[None, :], other=0.0,
        )  # fmt: skip
        acc = tl.dot(x, tl.trans(w), acc)
        if GATED:
            up = tl.load(
                w_ptr + (N + offs_n)[:, None].to(tl.int64) * s_wn + (k0 + offs_k)[None, :],
                mask=n_ok[:, None] & k_ok[None, :], other=0.0,
            )  # fmt: skip
            acc_up = tl.dot(x, tl.trans(up), acc_up)
    if GATED:  # silu(gate) * up from the rounded halves, as the unfused pair computes it
        gate = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc = gate / (1.0 + tl.exp(-gate)) * acc_up.to(out_ptr.dtype.element_ty).to(tl.float32)
    mn_ok = m_ok[:, None] & n_ok[None, :]
    if SUMMED:  # park this split's sum; the tile's last split to finish adds them all up
        part = offs_m[:, None] * N + offs_n[None, :]
        tl.store(parts_ptr + split * M * N + part, acc, mask=mn_ok)
        tl.debug_barrier()  # every thread's part is written before the count says so
        if tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel") == tl.num_programs(1) - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(tl.num_programs(1)):  # in split order: the same sum every time
                acc += tl.load(parts_ptr + s * M * N + part, mask=mn_ok, other=0.0,
                               cache_modifier=".cg")  # fmt: skip
            tl.atomic_xchg(count_ptr + tl.program_id(0), 0)  # ready for the next launch
            _store_tile(acc, b_ptr, out_ptr, offs_m, offs_n, n_ok, mn_ok, s_om, HAS_BIAS)
    else:
        _store_tile(acc, b_ptr, out_ptr + split * s_os, offs_m, offs_n, n_ok, mn_ok, s_om,
                    HAS_BIAS)  # fmt: skip


def _store_tile(acc, b_ptr, out_ptr, offs_m, offs_n, n_ok, mn_ok, s_om, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    dst = out_ptr + offs_m[:, None] * s_om + offs_n[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mn_ok)


if triton is not None:  # one variant for any row count: warm-up compiles every tile height
    _store_tile = triton.jit(_store_tile)
    _skinny_linear_kernel = triton.jit(_skinny_linear_kernel, do_not_specialize=["M"])


def tile_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(block_n, block_k, num_warps, num_stages) for an [n, k] weight. Measured on an H200
    (benchmarks/linear_shapes.py): wide layers stream best in 64-feature tiles, narrow
    ones (o_proj, down) want fewer features and longer K steps so every SM stays busy."""
    if n >= WIDE:
        return 64, 256, 4, 3
    if n > k:
        return 64, 128, 4, 5
    return 32, 512, 4, 5


def split_config(n: int, k: int) -> tuple[tuple[int, int, int, int], int]:
    """(tile, splits) for a narrow [n, k] weight (o_proj, down, qkv) at 17-64 rows, where
    cuBLAS reaches 69-80 % of the copy bandwidth. Best of `linear_shapes.py --batch 64
    --splits 2 3 4` on an H200: 2 splits of 64-feature tiles, 11.0 / 30.8 µs against
    cuBLAS's 12.0 / 35.8 for o_proj / down."""
    return (64, 128, 4, 5), 2


def gated_config(rows: int) -> tuple[int, int, int, int]:
    """The tile of a gated (gate/up + SiLU) launch; each program reads 2 x block_n weight
    rows. Best of `linear_shapes.py --gated` on an H200 (8B shape): 57.4 µs at 1 row and
    61.0 at 64 against 64.1 / 68.4 for the matmul and the SiLU kernel apart."""
    return (32, 256, 4, 3) if rows <= 16 else (64, 128, 4, 4)


@dataclass(frozen=True)
class PartialSums:
    """A linear's output as float32 partial sums over K, [splits, rows, n]. The residual add
    that consumes it (`fused.rms_norm`) sums them, so no reduce kernel runs."""

    parts: torch.Tensor

    def total(self, dtype: torch.dtype) -> torch.Tensor:
        return self.parts.sum(0).to(dtype)


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    config: tuple[int, int, int, int] | None = None,
    splits: int = 1,
    gated: bool = False,
    summed: bool = False,
) -> torch.Tensor:
    """`x @ weight.T (+ bias)` for `x` of at most `TILE_ROWS` rows, contiguous in K; half or
    bfloat16. The grid depends on shapes only (CUDA-graph safe).

    With `splits` > 1, K is cut in as many pieces and the result is their float32 partial
    sums, [splits, m, n], for the consumer to add (`PartialSums`): more programs stream the
    weight of a narrow layer, and no reduce kernel runs.

    `gated`: the weight is [gate; up] of an MLP and the result is silu(x @ gate.T) * (x @
    up.T), [m, n / 2]: each program streams the same features of both halves, so the
    activation costs no launch and its input is never written out.

    `summed` (with `splits`): the result is `x @ weight.T` after all, in x's dtype: the last
    split of each feature tile to finish adds up the tile's parts (in split order, so the
    sum is the same every run), for a consumer that cannot take partial sums."""
    m, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    assert m <= TILE_ROWS and weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    assert not gated or (splits == 1 and bias is None and weight.shape[0] % 2 == 0)
    summed = summed and splits > 1
    assert splits == 1 or summed or bias is None, "partial sums carry no bias"
    if out is None:
        parted = splits > 1 and not summed
        shape, dtype = ((splits, m, n), torch.float32) if parted else ((m, n), x.dtype)
        out = torch.empty(shape, dtype=dtype, device=x.device)
    block_n, block_k, num_warps, num_stages = config or (
        gated_config(m) if gated else tile_config(n, k)
    )
    tiles = triton.cdiv(n, block_n)
    if summed:
        parts = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
        counts = _tile_counts(x.device, tiles)
    else:
        parts = counts = out  # unused
    k_per_split = triton.cdiv(triton.cdiv(k, block_k), splits) * block_k
    _skinny_linear_kernel[(tiles, splits)](
        x, weight, bias if bias is not None else weight, out, parts, counts, m, n, k,
        k_per_split, x.stride(0), weight.stride(0), out.stride(-2),
        out.stride(0) if out.dim() == 3 else 0,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=max(16, triton.next_power_of_2(m)),
        HAS_BIAS=bias is not None, GATED=gated, SUMMED=summed,
        num_warps=num_warps, num_stages=num_stages, **launch_options(x),
    )  # fmt: skip
    return out


_TILE_COUNTS: dict[torch.device, torch.Tensor] = {}


def _tile_counts(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 counters, one per feature tile, shared by every summed launch on the
    device (each launch leaves them at zero, and launches on one stream run in turn). Made
    before any CUDA-graph capture (`warm_up_linears`): one made inside would hold garbage."""
    counts = _TILE_COUNTS.get(device)
    if counts is None or counts.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("skinny_linear: tile counters must exist before graph capture")
        counts = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _TILE_COUNTS[device] = counts
    return counts


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, through the skinny kernel where it applies: a CUDA batch of few rows, or
    of up to `TILE_ROWS` for a layer narrow enough that cuBLAS leaves SMs idle (qkv), with
    K split and summed inside the launch."""
    rows = x.shape[0] if x.dim() == 2 else TILE_ROWS + 1
    gpu_half = triton is not None and x.is_cuda and x.dtype != torch.float32
    if not gpu_half or rows > TILE_ROWS or (rows > MAX_ROWS and weight.shape[0] >= WIDE):
        return torch.nn.functional.linear(x, weight, bias)
    x = x if x.stride(1) == 1 else x.contiguous()
    if rows <= MAX_ROWS:
        return skinny_linear(x, weight, bias=bias)
    config, splits = split_config(*weight.shape)
    return skinny_linear(x, weight, bias=bias, config=config, splits=splits, summed=True)


def gated_mlp_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up of a [gate; up] weight in one launch where the skinny kernel applies
    (a CUDA batch of up to `TILE_ROWS` rows); None elsewhere, for the caller's two steps."""
    if triton is None or not x.is_cuda or x.dim() != 2 or x.shape[0] > TILE_ROWS:
        return None
    if x.dtype == torch.float32:
        return None
    return skinny_linear(x if x.stride(1) == 1 else x.contiguous(), weight, gated=True)


def linear_into_residual(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | PartialSums:
    """`linear` for a layer whose output only feeds the residual add: at 17-64 rows on a GPU,
    a narrow weight's K is split and the partial sums are left for that add."""
    rows_ok = x.dim() == 2 and MAX_ROWS < x.shape[0] <= TILE_ROWS
    n, k = weight.shape
    if triton is None or not x.is_cuda or not rows_ok or n > k or x.dtype == torch.float32:
        return linear(x, weight, None)
    config, splits = split_config(n, k)
    x = x if x.stride(1) == 1 else x.contiguous()
    return PartialSums(skinny_linear(x, weight, config=config, splits=splits))
