"""Writing a step's keys and values into the paged KV cache, with RoPE fused in.

One program per token. `store_kv` copies its K and V rows into their slot; `rope_store_kv`
also rotates q in place and k on its way into the cache, so that a layer's RoPE and KV store
are one launch instead of two: a batch-1 decode step runs some 350 small kernels, and each
one saved is a few microseconds of the step. For decode-only steps `rope_store` does the same
inside the attention kernel (`attention.paged_attention(new_kv=...)`), one launch fewer
again. A slot below 0 marks a padding row (CUDA graphs): nothing is stored for it. RoPE math
runs in float32 and rounds once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tandem.engine.kernels.pdl import launch_options, pdl_prologue


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
def _kv_store_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, pos_ptr, cs_ptr,
    s_qt, s_qh, s_kt, s_kh, s_kd, s_vt, s_vh, s_vd, s_cb, s_co, s_ch, s_cd, s_cs,
    NUM_Q_HEADS: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, ROTATE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_prologue(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    store = (h < NUM_HEADS) & ((h * 0 + slot) >= 0)  # a tensor: the interpreter wants one
    dst = (slot // BLOCK_SIZE) * s_cb + (slot % BLOCK_SIZE) * s_co + h * s_ch
    k_row = k_ptr + t * s_kt + h * s_kh
    if ROTATE:  # rotate-half RoPE: each half of a head pairs with the other
        half = HEAD_D // 2
        d = tl.arange(0, BLOCK_D // 2)
        d_mask = d < half
        cs_row = cs_ptr + tl.load(pos_ptr + t).to(tl.int64) * s_cs
        cos = tl.load(cs_row + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        sin = tl.load(cs_row + half + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        _rope_heads(q_ptr + t * s_qt, s_qh, NUM_Q_HEADS, half, cos, sin, d, d_mask, BLOCK_QH)
        mask = store & d_mask[None, :]
        k1 = tl.load(k_row + d[None, :] * s_kd, mask=mask, other=0.0).to(tl.float32)
        k2 = tl.load(k_row + (half + d[None, :]) * s_kd, mask=mask, other=0.0).to(tl.float32)
        kc = kc_ptr + dst
        out_ty = kc_ptr.dtype.element_ty
        tl.store(kc + d[None, :] * s_cd, (k1 * cos - k2 * sin).to(k_ptr.dtype.element_ty)
                 .to(out_ty), mask=mask)  # fmt: skip
        tl.store(kc + (half + d[None, :]) * s_cd, (k2 * cos + k1 * sin)
                 .to(k_ptr.dtype.element_ty).to(out_ty), mask=mask)  # fmt: skip
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = store & (d < HEAD_D)
    if not ROTATE:
        k = tl.load(k_row + d * s_kd, mask=mask)
        tl.store(kc_ptr + dst + d * s_cd, k.to(kc_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + t * s_vt + h * s_vh + d * s_vd, mask=mask)
    tl.store(vc_ptr + dst + d * s_cd, v.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rope_store(
    q, q_rows, row_mask, tok, kv_head, s_qd, k_ptr, v_ptr, slot_ptr, pos_ptr, cs_ptr, kc_ptr,
    vc_ptr, s_kt, s_kh, s_vt, s_vh, s_cs, s_cb, s_co, s_ch, s_cd, owns_slot,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    """Rotate-half RoPE on the loaded q rows (as `rope_store_kv` computes it: float32, one
    rounding) and, in the program whose KV tiles hold the token's slot, rotate its key and
    store key and value there. A barrier then makes the stores visible to the whole program."""
    half = HEAD_D // 2
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_D
    partner = tl.where(d < half, d + half, d - half)  # x1 pairs with x2 and back
    sign = tl.where(d < half, -1.0, 1.0)
    cs_row = cs_ptr + tl.load(pos_ptr + tok).to(tl.int64) * s_cs
    cos = tl.load(cs_row + d % half, mask=d_ok, other=0.0).to(tl.float32)
    sin = tl.load(cs_row + half + d % half, mask=d_ok, other=0.0).to(tl.float32) * sign
    q_p = tl.load(q_rows + partner[None, :] * s_qd, mask=row_mask, other=0.0).to(tl.float32)
    q = (q.to(tl.float32) * cos[None, :] + q_p * sin[None, :]).to(q.dtype)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if owns_slot and slot >= 0:
        k_row = k_ptr + tok.to(tl.int64) * s_kt + kv_head * s_kh
        k = tl.load(k_row + d, mask=d_ok, other=0.0)
        k_p = tl.load(k_row + partner, mask=d_ok, other=0.0).to(tl.float32)
        k = (k.to(tl.float32) * cos + k_p * sin).to(k.dtype)
        v = tl.load(v_ptr + tok.to(tl.int64) * s_vt + kv_head * s_vh + d, mask=d_ok)
        dst = (slot // BLOCK_SIZE) * s_cb + (slot % BLOCK_SIZE) * s_co + kv_head * s_ch + d * s_cd
        tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=d_ok)
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=d_ok)
    tl.debug_barrier()
    return q


@dataclass
class NewKV:
    """A decode step's keys and values [T, kv_heads, head_dim] before RoPE and the store:
    their slots [T] (< 0: padding, nothing stored), positions [T] and the float32 cos/sin
    table of `rope_cos_sin`."""

    k: torch.Tensor
    v: torch.Tensor
    slot_mapping: torch.Tensor
    positions: torch.Tensor
    cos_sin: torch.Tensor

    def check(self, q: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k, v, table = self.k, self.v, self.cos_sin
        if k.stride(-1) != 1 or v.stride(-1) != 1 or table.stride(-1) != 1 or q.shape[2] % 2:
            raise ValueError("new_kv needs contiguous head dims and an even head_dim")
        if k.shape != v.shape or k.shape[0] != q.shape[0] or table.shape[-1] != q.shape[2]:
            raise ValueError("q, k, v and the cos/sin table disagree on tokens or head_dim")
        return k, v, self.slot_mapping, self.positions, table


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write this step's K/V rows `[T, kv_heads, head_dim]` into their slots; slot < 0 skips."""
    _launch(None, k, v, k_cache, v_cache, slot_mapping, None, None)


def rope_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
) -> None:
    """RoPE on q `[T, heads, head_dim]` in place and on k as it is stored, V stored beside
    it. `cos_sin` is the float32 [max_positions, head_dim] table of `rope_cos_sin` (cos in
    the first half); q's and the table's last dims must be contiguous. k is left as it was."""
    if q.stride(-1) != 1 or cos_sin.stride(-1) != 1:
        raise ValueError("q and cos_sin need a contiguous last dim")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or positions.shape != q.shape[:1]:
        raise ValueError("q, k and positions disagree on tokens or head_dim")
    if q.shape[2] % 2 or cos_sin.shape[-1] != q.shape[2]:
        raise ValueError("head_dim must be even and match the table's last dim")
    _launch(q, k, v, k_cache, v_cache, slot_mapping, positions, cos_sin)


def _launch(q, k, v, k_cache, v_cache, slot_mapping, positions, cos_sin) -> None:
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k_cache.stride() == v_cache.stride() and k_cache.shape[2:] == k.shape[1:]
    rotate = q is not None
    block_d = triton.next_power_of_2(head_dim)
    num_q_heads = q.shape[1] if rotate else 1
    _kv_store_kernel[(num_tokens,)](
        q if rotate else k, k, v, k_cache, v_cache, slot_mapping,
        positions if rotate else slot_mapping, cos_sin if rotate else k,
        q.stride(0) if rotate else 0, q.stride(1) if rotate else 0,
        *k.stride(), *v.stride(), *k_cache.stride(), cos_sin.stride(0) if rotate else 0,
        NUM_Q_HEADS=num_q_heads, NUM_HEADS=num_heads, HEAD_D=head_dim,
        BLOCK_QH=max(1, min(triton.next_power_of_2(num_q_heads), 4096 // block_d)),
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=block_d,
        BLOCK_SIZE=k_cache.shape[1], ROTATE=rotate,
        num_warps=4 if num_heads * head_dim >= 1024 or rotate else 1, **launch_options(k),
    )  # fmt: skip
