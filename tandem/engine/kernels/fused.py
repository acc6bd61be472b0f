"""Fused Triton kernels for a Llama layer's element-wise parts: RMSNorm (+ residual add),
rotary embedding and SiLU-and-mul.

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
    connection) and return `(normed, x)`: the sum is the next layer's residual.
    """
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

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        res_ptr,
        w_ptr,
        out_ptr,
        res_out_ptr,
        stride_x0,
        stride_x1,
        stride_r0,
        stride_r1,
        n_inner,
        n_cols,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program per row; rows are indexed (outer, inner) so that a [T, heads, dim] view
        # with any token and head strides (Qwen3's per-head q/k norm) needs no copy.
        outer = tl.program_id(0).to(tl.int64)
        inner = tl.program_id(1).to(tl.int64)
        row_out = outer * n_inner + inner
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + outer * stride_x0 + inner * stride_x1 + cols, mask=mask, other=0.0)
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
    def _rope_heads(
        base_ptr,
        stride_h,
        num_heads,
        half,
        cos,
        sin,
        d,
        d_mask,
        BLOCK_H: tl.constexpr,
    ):
        """Rotate all heads of one token of q or k, BLOCK_H heads at a time."""
        h = tl.arange(0, BLOCK_H)
        for h0 in range(0, num_heads, BLOCK_H):
            heads = h0 + h
            mask = (heads < num_heads)[:, None] & d_mask[None, :]
            p1 = base_ptr + heads.to(tl.int64)[:, None] * stride_h + d[None, :]
            x1 = tl.load(p1, mask=mask, other=0.0)
            x2 = tl.load(p1 + half, mask=mask, other=0.0)
            dtype = x1.dtype
            x1 = x1.to(tl.float32)
            x2 = x2.to(tl.float32)
            tl.store(p1, (x1 * cos - x2 * sin).to(dtype), mask=mask)
            tl.store(p1 + half, (x2 * cos + x1 * sin).to(dtype), mask=mask)

    @triton.jit
    def _rope_kernel(
        q_ptr,
        k_ptr,
        pos_ptr,
        cos_sin_ptr,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_cs,
        num_q_heads,
        num_k_heads,
        half,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program per token: its cos/sin row is read once and used for every q and k head.
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < half
        row = cos_sin_ptr + pos * stride_cs
        cos = tl.load(row + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        sin = tl.load(row + half + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        _rope_heads(
            q_ptr + t * stride_qt, stride_qh, num_q_heads, half, cos, sin, d, d_mask, BLOCK_H
        )
        _rope_heads(
            k_ptr + t * stride_kt, stride_kh, num_k_heads, half, cos, sin, d, d_mask, BLOCK_H
        )

    @triton.jit
    def _silu_and_mul_kernel(
        x_ptr,
        out_ptr,
        stride_x,
        stride_out,
        n_inter,
        BLOCK: tl.constexpr,
    ):
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

    x: [..., hidden] (a 3D [T, heads, dim] view may have any token and head strides); the
    outputs are new contiguous tensors of x's shape.
    """
    _require_triton()
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight shape {tuple(weight.shape)} != ({n},)")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("residual must have x's shape and dtype")
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = None
    if residual is not None:
        res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
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
        x3.stride(0),
        x3.stride(1),
        r3.stride(0),
        r3.stride(1),
        x3.shape[1],
        n,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=_num_warps(block),
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


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `rotary_embedding_torch`: rotates q and k in place, returns them.

    q [T, heads, dim] and k [T, kv_heads, dim] may be strided views (of one fused qkv
    output, say) as long as the last dim is contiguous; they must not overlap. cos_sin is the
    float32 [max_positions, dim] table of `rope_cos_sin`; positions are int32 or int64 [T].
    Math in float32 with float32 cos/sin, rounded once to q's dtype.
    """
    _require_triton()
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError("q and k must be [tokens, heads, head_dim]")
    t, num_q_heads, head_dim = q.shape
    if k.shape[0] != t or k.shape[2] != head_dim or positions.shape != (t,):
        raise ValueError("q, k and positions disagree on tokens or head_dim")
    if head_dim % 2 or cos_sin.shape[-1] != head_dim:
        raise ValueError(f"head_dim {head_dim} must be even and match the table's last dim")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin.stride(-1) != 1:
        raise ValueError("q, k and cos_sin need a contiguous last dim (they are updated in place)")
    if t == 0:
        return q, k
    half = head_dim // 2
    block_d = triton.next_power_of_2(half)
    max_heads = triton.next_power_of_2(max(num_q_heads, k.shape[1]))
    block_h = max(1, min(max_heads, 2048 // block_d))
    _rope_kernel[(t,)](
        q,
        k,
        positions,
        cos_sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin.stride(0),
        num_q_heads,
        k.shape[1],
        half,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return q, k


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
    )
    return out
