"""Paged attention over the KV cache, and the KV store, in Triton.

One layer's cache is `[num_blocks, block_size, num_kv_heads, head_dim]` for K and for V; a
step's query tokens from many sequences are packed into one flat batch and
`query_start_loc` says where each sequence's rows start (the KV store is `kv_store.py`).
One kernel serves both phases:

- prefill / mixed batches: a program owns `BLOCK_Q` query tokens of one sequence times the
  `group` query heads that share one KV head (`BLOCK_M = BLOCK_Q * group` rows, so each KV
  tile gathered through the block table feeds every head of the group). It walks KV tiles
  of `BLOCK_N` tokens up to its causal frontier: tiles every row sees run without masks, only
  the diagonal tiles are masked. The grid is `T // BLOCK_Q + B` programs per KV head, a bound
  on the number of query tiles, and each program finds its sequence by a binary search
  over `query_start_loc`: the launch depends on shapes only, so it can be CUDA-graph captured.
- decode (`max_query_len == 1`): one program per (sequence, KV head, split). With
  `num_splits > 1` each one covers a slice of the context and writes a partial output and
  its log-sum-exp; a second kernel combines them (split-K, for long contexts at small batch).

Softmax runs online in float32 with exp2; float32 inputs use exact ("ieee") dots so that the
GPU path matches a float32 reference, half inputs use the tensor cores.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from tandem.engine.kernels.kv_store import NewKV, rope_store
from tandem.engine.kernels.pdl import launch_options, pdl_prologue

_LOG2E = 1.4426950408889634


@triton.jit
def _attend(
    acc, l_i, m_i, q, row_pos, kc_ptr, vc_ptr, bt_ptr, seq_len, t_lo, t_hi, qk_scale,
    kv_off, s_cb, s_co,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """Online softmax over KV tiles [t_lo, t_hi); MASKED applies causal and length masks."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = (tl.arange(0, BLOCK_D) < HEAD_D)[None, :]
    for t in range(t_lo, t_hi):
        pos = t * BLOCK_N + offs_n
        if MASKED:
            n_ok = pos < seq_len
            blk = tl.load(bt_ptr + pos // BLOCK_SIZE, mask=n_ok, other=0)
            kv_mask = n_ok[:, None] & d_ok
        else:
            blk = tl.load(bt_ptr + pos // BLOCK_SIZE)
            kv_mask = d_ok
        ptrs = (blk.to(tl.int64) * s_cb + (pos % BLOCK_SIZE) * s_co)[:, None] + kv_off[None, :]
        if MASKED or BLOCK_D != HEAD_D:
            k = tl.load(kc_ptr + ptrs, mask=kv_mask, other=0.0)
            v = tl.load(vc_ptr + ptrs, mask=kv_mask, other=0.0)
        else:
            k = tl.load(kc_ptr + ptrs)
            v = tl.load(vc_ptr + ptrs)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            s = tl.where(pos[None, :] <= row_pos[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # row sees nothing yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Ints that change from step to step are not specialised on (Triton would compile a variant
# for 1, for multiples of 16 and for the rest, each a second-long stall mid-serving).
@triton.jit(do_not_specialize=["first_seq", "num_seqs", "s_bt"])
def _paged_attn_kernel(
    q_ptr, kc_ptr, vc_ptr, out_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, part_ptr, lse_ptr,
    k_ptr, v_ptr, slot_ptr, pos_ptr, cs_ptr,
    first_seq, num_seqs, num_heads, qk_scale,
    s_qt, s_qh, s_qd, s_ot, s_oh, s_od, s_cb, s_co, s_ch, s_cd, s_bt,
    s_kt, s_kh, s_vt, s_vh, s_cs,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DECODE: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, NEW_KV: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_prologue(PDL)
    kv_head = tl.program_id(1)
    # This launch serves sequences [first_seq, first_seq + num_seqs): offsets taken here, not
    # by slicing the tensors, keep every pointer as aligned as its buffer.
    qsl_ptr += first_seq
    seq_lens_ptr += first_seq
    bt_ptr += first_seq.to(tl.int64) * s_bt
    if DECODE:
        seq = tl.program_id(0)
        q_tile = 0
    else:
        # Sequence i's query tiles are numbered from (qsl[i] - qsl[0]) // BLOCK_Q + i: find
        # the last sequence whose first tile is at or before this program's.
        pid = tl.program_id(0)
        base = tl.load(qsl_ptr)
        lo = pid * 0
        hi = pid * 0 + num_seqs - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if (tl.load(qsl_ptr + mid) - base) // BLOCK_Q + mid <= pid:
                lo = mid
            else:
                hi = mid - 1
        seq = lo
        q_tile = pid - ((tl.load(qsl_ptr + seq) - base) // BLOCK_Q + seq)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    q0 = q_tile * BLOCK_Q
    if q0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len  # tokens cached before this step's

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tok = q0 + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)
    row_pos = ctx + tok
    row_mask = row_ok[:, None] & (offs_d < HEAD_D)[None, :]
    q_rows = (q_start + tok) * s_qt + head * s_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :] * s_qd, mask=row_mask, other=0.0)

    # Keys [0, n_full * BLOCK_N) are visible to every row: no masks there.
    last_tok = tl.minimum(q0 + BLOCK_Q, q_len) - 1
    kv_end = tl.minimum(tl.maximum(ctx + last_tok + 1, 0), seq_len)
    n_tiles = tl.cdiv(kv_end, BLOCK_N)
    n_full = tl.minimum(tl.maximum(ctx + q0 + 1, 0) // BLOCK_N, n_tiles)
    t_lo = 0
    t_hi = n_tiles
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(n_tiles, NUM_SPLITS)
        t_lo = tl.program_id(2) * per_split
        t_hi = tl.minimum(t_lo + per_split, n_tiles)
    if NEW_KV:  # decode: RoPE on q and on this token's key, stored before it is read back
        q = rope_store(
            q, q_ptr + q_rows[:, None], row_mask, q_start, kv_head, s_qd, k_ptr, v_ptr,
            slot_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, s_kt, s_kh, s_vt, s_vh, s_cs, s_cb,
            s_co, s_ch, s_cd, (t_lo <= n_tiles - 1) & (n_tiles - 1 < t_hi),
            HEAD_D, BLOCK_D, BLOCK_SIZE,
        )  # fmt: skip
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * s_bt
    kv_off = kv_head * s_ch + offs_d * s_cd
    acc, l_i, m_i = _attend(
        acc, l_i, m_i, q, row_pos, kc_ptr, vc_ptr, bt_row, seq_len, t_lo,
        tl.minimum(t_hi, n_full), qk_scale, kv_off, s_cb, s_co,
        False, BLOCK_N, BLOCK_D, HEAD_D, BLOCK_SIZE, PRECISION, UPCAST,
    )  # fmt: skip
    acc, l_i, m_i = _attend(
        acc, l_i, m_i, q, row_pos, kc_ptr, vc_ptr, bt_row, seq_len, tl.maximum(t_lo, n_full),
        t_hi, qk_scale, kv_off, s_cb, s_co,
        True, BLOCK_N, BLOCK_D, HEAD_D, BLOCK_SIZE, PRECISION, UPCAST,
    )  # fmt: skip

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row with no keys gives zeros
    if NUM_SPLITS > 1:
        part = ((q_start + tok) * num_heads + head) * NUM_SPLITS + tl.program_id(2)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.maximum(l_i, 1e-30)))
        tl.store(lse_ptr + part, lse, mask=row_ok)
        tl.store(part_ptr + part[:, None] * HEAD_D + offs_d[None, :], o, mask=row_mask)
    else:
        o_rows = (q_start + tok) * s_ot + head * s_oh
        dst = out_ptr + o_rows[:, None] + offs_d[None, :] * s_od
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _combine_splits_kernel(
    out_ptr, part_ptr, lse_ptr, qsl_ptr, num_heads, s_ot, s_oh, s_od,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_prologue(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(qsl_ptr + seq)
    if tl.load(qsl_ptr + seq + 1) <= row:
        return
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    part = (row * num_heads + head) * NUM_SPLITS + offs_s
    lse = tl.load(lse_ptr + part, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    mask = s_ok[:, None] & (offs_d < HEAD_D)[None, :]
    parts = tl.load(part_ptr + part[:, None] * HEAD_D + offs_d[None, :], mask=mask, other=0.0)
    total = tl.sum(w, 0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    dst = out_ptr + row * s_ot + head * s_oh + offs_d * s_od
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_D)


# Preferred (BLOCK_M, BLOCK_N, num_warps, num_stages) for query tiles, best first; the first
# whose tiles fit the device's shared memory wins. Measured on an H200 (benchmarks/
# attention_kernels.py --sweep): for head_dim 128, 128x128 tiles, 8 warps, 3 stages run an
# 8192-token causal prefill at ~390 TFLOP/s; GPUs with less shared memory get smaller tiles.
# float32 (exact-match runs, tests) keeps tiles small: its accumulators fill the registers.
_PREFILL_TILES = {
    "half": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 2)],
    "half_small_d": [(128, 64, 4, 3), (64, 64, 4, 2)],  # head_dim <= 64
    "half_large_d": [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1)],  # head_dim > 128
    "float32": [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1)],
}


def _shared_memory(device: torch.device) -> int:
    """Bytes of shared memory a program may use; the interpreter has no limit."""
    if device.type != "cuda":
        return 1 << 30
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 101376)


#: Queries up to this long (many short prompts in one step) take `_SHORT_QUERY_TILE`: each
#: program sees a KV tile or two, so narrow tiles and no pipelining fit more programs per SM.
#: 64 prompts of 128 tokens on an H200: 84 µs a layer against 164 with the default tile.
_SHORT_QUERY = 128
_SHORT_QUERY_TILE = (128, 32, 8, 1)


def _prefill_config(
    head_dim: int, dtype: torch.dtype, smem: int, max_query_len: int = 1 << 30
) -> tuple[int, int, int, int]:
    """Tile shape for prefill/mixed batches: Q tile plus `stages` K and V tiles must fit."""
    size = torch.finfo(dtype).bits // 8
    kind = "half_small_d" if head_dim <= 64 else "half" if head_dim <= 128 else "half_large_d"
    kind = "float32" if size == 4 else kind
    if max_query_len <= _SHORT_QUERY and kind in ("half", "half_small_d"):
        return _SHORT_QUERY_TILE
    for block_m, block_n, warps, stages in _PREFILL_TILES[kind]:
        if (block_m + 2 * stages * block_n) * head_dim * size <= smem:
            return block_m, block_n, warps, stages
    return 16, 16, 4, 1


def _decode_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for decode: memory-bound, 64-token KV tiles."""
    if head_dim > 128 or (dtype == torch.float32 and head_dim > 64):
        return 32, 4, 2
    return 64, 4, 3


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    *,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_query_len: int,
    num_splits: int = 1,
    num_decodes: int = 0,
    new_kv: NewKV | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries over their sequences' paged K/V; writes `out`.

    The grid depends on shapes and the Python ints only (CUDA-graph safe). `num_splits` is
    used for decode-only batches (`max_query_len == 1`) and ignored otherwise. Optional
    `num_decodes`: the batch's first `num_decodes` sequences have one query each; they then
    get decode-sized tiles in a launch of their own instead of 128-row query tiles (a mixed
    batch of 200 decodes and a 1024-token chunk ran 1.4x faster so on an H200). Rows past
    `query_start_loc[-1]` are left untouched; a sequence with `seq_len == 0` gives zeros.
    With `new_kv`, a decode-only batch's q arrives unrotated and its keys and values are not
    yet stored: the same launch does what `kv_store.rope_store_kv` would (one launch a layer
    fewer), except that q is rotated in registers, not in place.
    """
    num_tokens, num_seqs = q.shape[0], seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    assert k_cache.stride() == v_cache.stride() and block_tables.stride(1) == 1
    if new_kv is not None:
        if max_query_len > 1:
            raise ValueError("new_kv is for decode-only batches")
        _launch(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, scale,
                0, num_seqs, num_tokens, 1, num_splits, new_kv)  # fmt: skip
        return out
    if max_query_len > 1 and 0 < num_decodes < num_seqs:
        n = num_decodes
        _launch(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, scale,
                0, n, n, 1, 1)  # fmt: skip
        _launch(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, scale,
                n, num_seqs - n, num_tokens - n, max_query_len, 1)  # fmt: skip
    else:
        _launch(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, scale,
                0, num_seqs, num_tokens, max_query_len, num_splits)  # fmt: skip
    return out


def _launch(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, scale: float,
            first_seq: int, num_seqs: int, num_rows: int, max_query_len: int,
            num_splits: int, new_kv: NewKV | None = None) -> None:  # fmt: skip
    """One kernel launch over sequences [first_seq, first_seq + num_seqs), whose queries span
    at most `num_rows` rows."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0 and block_size & (block_size - 1) == 0
    group = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    # Triton's interpreter multiplies bfloat16 as raw bits: there, dot in float32 instead.
    upcast = q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"
    decode = max_query_len <= 1
    splits = max(1, num_splits) if decode else 1
    if decode:
        block_q, block_m = 1, max(16, triton.next_power_of_2(group))
        block_n, num_warps, num_stages = _decode_config(head_dim, q.dtype)
        grid = (num_seqs, num_kv_heads, splits)
    else:
        smem = _shared_memory(q.device)
        block_m, block_n, num_warps, num_stages = _prefill_config(
            head_dim, q.dtype, smem, max_query_len
        )
        # Short queries (speculative or tiny chunks) need fewer rows per tile.
        want = max(16, triton.next_power_of_2(max_query_len * group))
        block_m = max(min(block_m, want), triton.next_power_of_2(group))
        block_q = block_m // group
        grid = (num_rows // block_q + num_seqs, num_kv_heads, 1)
    if splits > 1:
        part = torch.empty((num_tokens, num_heads, splits, head_dim), dtype=torch.float32,
                           device=q.device)  # fmt: skip
        lse = torch.empty((num_tokens, num_heads, splits), dtype=torch.float32, device=q.device)
    else:
        part = lse = out  # unused
    if new_kv is not None:
        extra = k, v, _, _, table = new_kv.check(q)
        extra_strides = (k.stride(0), k.stride(1), v.stride(0), v.stride(1), table.stride(0))
    else:
        extra, extra_strides = (q, q, seq_lens, seq_lens, q), (0,) * 5
    _paged_attn_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, part, lse, *extra,
        first_seq, num_seqs, num_heads, scale * _LOG2E,
        *q.stride(), *out.stride(), *k_cache.stride(), block_tables.stride(0), *extra_strides,
        GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d,
        HEAD_D=head_dim, BLOCK_SIZE=block_size, DECODE=decode, NUM_SPLITS=splits,
        PRECISION=precision, UPCAST=upcast, NEW_KV=new_kv is not None, num_warps=num_warps,
        num_stages=num_stages, **launch_options(q),
    )  # fmt: skip
    if splits > 1:
        _combine_splits_kernel[(num_seqs, num_heads)](
            out, part, lse, query_start_loc, num_heads, *out.stride(),
            NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), HEAD_D=head_dim,
            BLOCK_D=triton.next_power_of_2(head_dim), num_warps=1 if head_dim <= 64 else 2,
            **launch_options(q),
        )  # fmt: skip


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Split-K factor for a decode batch: enough programs to fill the GPU twice over.

    Splitting only pays when (sequence, KV head) pairs are well short of the SMs and each
    split still gets a few hundred tokens; beyond 16 splits the combine step starts to cost.
    Each factor is a kernel variant of its own, so only powers of two are used.
    """
    programs = max(1, num_seqs * num_kv_heads)
    if programs >= num_sms or max_seq_len < 1024:
        return 1
    splits = min(math.ceil(2 * num_sms / programs), max_seq_len // 512, 16)
    return 1 << (max(1, splits).bit_length() - 1)  # a power of two: five kernel variants
