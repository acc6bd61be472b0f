"""Fused Triton kernels for a Llama layer's element-wise parts: RMSNorm (+ residual add)
and SiLU-and-mul; the rotary embedding is fused with the KV store (`kv_store.py`), and its
torch twin is here.

Eager torch spends several kernels (and as many passes over the hidden state) on each of
these: RMSNorm alone is pow, mean, add, rsqrt, mul, cast, mul. One Triton kernel each reads
the input once and writes the output once, which is what decode steps, bound by launches and
memory traffic, want.

Each kernel has a torch twin (`*_torch`) whose numerics are exactly those of the model code in
`tandem.engine.models.llama` (and so of Hugging Face's Llama): the CPU path and the tests use
them. The Triton versions compute in float32 and round once to the model dtype, so in
bfloat16/float16 they may differ from a twin by one rounding step where the twin rounds twice;
in float32 they agree to float rounding.

Why not `torch.compile`: it would fuse these too, but it costs tens of seconds of compile time
per shape bucket at start-up, recompiles on new shapes, and has to be coaxed into cooperating
with our own CUDA-graph capture. Hand-written kernels launch from shapes alone.

All launches are CUDA-graph safe: grids and block sizes come from tensor shapes only, nothing
reads device memory on the host. Run each kernel once before capturing a graph so that its
compilation (which loads a module) happens outside the capture. Positions are not bounds
checked (that would need a host sync): they must be below the table's `max_positions`.

Only Triton features that Triton 3.6 and later accept are used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.engine.kernels.pdl import launch_options, pdl_prologue
from tandem.engine.kernels.skinny_linear import PartialSums

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the torch twins still work
    triton = None
    tl = None

HAS_TRITON = triton is not None


# --------------------------------------------------------------------------- torch twins


def rms_norm_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, as Hugging Face's LlamaRMSNorm computes it.

    With `residual`, first `x = x + residual` in the model dtype (the decoder layer's skip
    connection) and return `(normed, x)`: the sum is the next layer's residual. x may be a
    linear's `PartialSums`, rounded to the model dtype once summed.
    """
    if isinstance(x, PartialSums):
        x = x.total(residual.dtype)
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(dtype)
    return out if residual is None else (out, residual)


def rotary_embedding_torch(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE in place on q [T, heads, dim] and k [T, kv_heads, dim].

    As the model (and Hugging Face) does it: cos/sin are rounded to the input dtype first and
    the products and sums are rounded in that dtype.
    """
    cos, sin = cos_sin[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)
    for x in (q, k):
        x1, x2 = x.chunk(2, dim=-1)
        x.copy_(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1))
    return q, k


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate, up] along the last dim.

    In bfloat16/float16 this rounds twice (after silu, after the product); the Triton kernel
    rounds once.
    """
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# --------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit(do_not_specialize=["stride_xp"])  # rows x hidden: any batch, one variant
    def _rms_norm_kernel(
        x_ptr,
        res_ptr,
        w_ptr,
        out_ptr,
        res_out_ptr,
        stride_xp,
        stride_x0,
        stride_x1,
        stride_r0,
        stride_r1,
        n_inner,
        n_cols,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        PARTS: tl.constexpr,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):
        pdl_prologue(PDL)
        # One program per row; rows are indexed (outer, inner) so that a [T, heads, dim] view
        # with any token and head strides (Qwen3's per-head q/k norm) needs no copy.
        outer = tl.program_id(0).to(tl.int64)
        inner = tl.program_id(1).to(tl.int64)
        row_out = outer * n_inner + inner
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x_row = x_ptr + outer * stride_x0 + inner * stride_x1 + cols
        if PARTS > 0:  # a linear's float32 partial sums: its output, rounded as cuBLAS would
            x = tl.load(x_row, mask=mask, other=0.0)
            for p in tl.static_range(1, PARTS):
                x += tl.load(x_row + p * stride_xp, mask=mask, other=0.0)
            x = x.to(res_out_ptr.dtype.element_ty)
        else:
            x = tl.load(x_row, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(
                res_ptr + outer * stride_r0 + inner * stride_r1 + cols, mask=mask, other=0.0
            )
            # Rounded to the model dtype, as torch's `x + residual` is.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row_out * n_cols + cols, x, mask=mask)
        xf = x.to(tl.float32)
        mean_sq = tl.sum(xf * xf, axis=0) / n_cols
        normed = xf * tl.rsqrt(mean_sq + eps)
        # Hugging Face's order: cast the normalised row to the model dtype, then scale.
        normed = normed.to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = (normed * w).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row_out * n_cols + cols, y, mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(
        x_ptr,
        out_ptr,
        stride_x,
        stride_out,
        n_inter,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):
        pdl_prologue(PDL)
        # 2D grid: rows × column blocks, so that a few decode rows still fill the GPU.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_inter
        base = x_ptr + row * stride_x
        gate = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(base + n_inter + cols, mask=mask, other=0.0).to(tl.float32)
        # torch's silu formula, x / (1 + exp(-x)): identical results in float32.
        y = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("the fused kernels need triton, which is not installed")


def _num_warps(block: int) -> int:
    """About 256 elements per warp, 1 to 8 warps: enough loads in flight per program."""
    return max(1, min(8, block // 256))


# --------------------------------------------------------------------------- launchers


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `rms_norm_torch`: one program per row, the residual add fused in.

    x: [..., hidden] (a 3D [T, heads, dim] view may have any token and head strides), or a
    linear's `PartialSums` that the residual add sums first; the outputs are new contiguous
    tensors of the residual's shape.
    """
    _require_triton()
    parts = None
    if isinstance(x, PartialSums):
        if residual is None:
            raise ValueError("partial sums need the residual they are added to")
        parts, x = x.parts, x.parts[0]
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight shape {tuple(weight.shape)} != ({n},)")
    dtype = x.dtype if parts is None else residual.dtype
    if residual is not None and (residual.shape != x.shape or residual.dtype != dtype):
        raise ValueError("residual must have x's shape and dtype")
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, dtype), device=x.device)
    res_out = None
    if residual is not None:
        res_out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if x.numel() == 0:
        return out if residual is None else (out, res_out)
    x3 = _rows3(x)
    r3 = _rows3(residual) if residual is not None else x3
    block = triton.next_power_of_2(n)
    grid = (x3.shape[0], x3.shape[1])
    _rms_norm_kernel[grid](
        x3,
        r3,
        weight.contiguous(),
        out,
        res_out if res_out is not None else out,
        parts.stride(0) if parts is not None else 0,
        x3.stride(0),
        x3.stride(1),
        r3.stride(0),
        r3.stride(1),
        x3.shape[1],
        n,
        eps,
        HAS_RESIDUAL=residual is not None,
        PARTS=parts.shape[0] if parts is not None else 0,
        BLOCK=block,
        num_warps=_num_warps(block),
        **launch_options(x),
    )
    return out if residual is None else (out, res_out)


def _rows3(x: torch.Tensor) -> torch.Tensor:
    """x as [outer, inner, n] with unit stride along n (a view when possible)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() > 3:
        x = x.reshape(-1, x.shape[-2], x.shape[-1])
    if x.shape[1] > 65535:  # the grid's second axis is limited to 65535
        x = x.reshape(-1, 1, x.shape[-1])
    return x


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton twin of `silu_and_mul_torch`: x [..., 2*I] (gate, up) -> [..., I].

    Math in float32, rounded once; the twin rounds twice in bfloat16/float16.
    """
    _require_triton()
    if x.shape[-1] % 2:
        raise ValueError("the last dim must hold gate and up halves")
    n_inter = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], n_inter), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out2 = out.view(-1, n_inter)
    block = min(1024, triton.next_power_of_2(n_inter))
    grid = (x2.shape[0], triton.cdiv(n_inter, block))
    _silu_and_mul_kernel[grid](
        x2,
        out2,
        x2.stride(0),
        out2.stride(0),
        n_inter,
        BLOCK=block,
        num_warps=_num_warps(block),
        **launch_options(x),
    )
    return out
