"""Triton paged attention and KV store against the torch reference (and that against SDPA).

On a CUDA machine the kernels run natively; elsewhere under Triton's interpreter, so shapes
are tiny. Caches start full of NaN: a kernel that reads a slot it should not (past a
sequence's end, a padding entry of the block table) turns its output NaN.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("triton is not installed", allow_module_level=True)

from tandem.engine.kernels.attention import choose_num_splits, paged_attention
from tandem.engine.kernels.attention_reference import paged_attention_reference
from tandem.engine.kernels.kv_store import NewKV, rope_store_kv, store_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


class Batch:
    """A paged cache holding `seqs` = [(seq_len, q_len)], scattered over shuffled blocks."""

    def __init__(self, seqs, *, heads, kv_heads, head_dim, block_size, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        need = [-(-s // block_size) for s, _ in seqs]
        num_blocks = sum(need) + 3  # the spare blocks stay NaN
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k_cache = torch.full(shape, float("nan"), dtype=dtype)
        self.v_cache = torch.full(shape, float("nan"), dtype=dtype)
        perm = torch.randperm(num_blocks, generator=g)
        spare = int(perm[-1])
        self.block_tables = torch.full((len(seqs), max(need, default=0) + 2), spare)
        self.keys, self.values, starts, used = [], [], [0], 0
        for i, (seq_len, q_len) in enumerate(seqs):
            blocks = perm[used : used + need[i]]
            used += need[i]
            self.block_tables[i, : need[i]] = blocks
            k = torch.randn(seq_len, kv_heads, head_dim, generator=g).to(dtype)
            v = torch.randn(seq_len, kv_heads, head_dim, generator=g).to(dtype)
            slots = blocks.repeat_interleave(block_size) * block_size + torch.arange(
                need[i] * block_size
            ) % block_size
            self.k_cache.flatten(0, 1)[slots[:seq_len]] = k
            self.v_cache.flatten(0, 1)[slots[:seq_len]] = v
            self.keys.append(k)
            self.values.append(v)
            starts.append(starts[-1] + q_len)
        self.seqs = seqs
        self.q = torch.randn(starts[-1], heads, head_dim, generator=g).to(dtype)
        self.meta = dict(
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor([s for s, _ in seqs], dtype=torch.int32),
            block_tables=self.block_tables.to(torch.int32),
            scale=head_dim**-0.5,
            max_query_len=max(q for _, q in seqs),
        )

    def to(self, device):
        for name in ("k_cache", "v_cache", "q"):
            setattr(self, name, getattr(self, name).to(device))
        for name in ("query_start_loc", "seq_lens", "block_tables"):
            self.meta[name] = self.meta[name].to(device)
        return self

    def run(self, fn, q=None, **overrides):
        q = self.q if q is None else q
        out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
        return fn(q, self.k_cache, self.v_cache, out, **{**self.meta, **overrides})


MIXED = [  # (seq_len, q_len)
    (37, 1),  # decode
    (21, 21),  # prefill, no prefix, partial last block
    (49, 30),  # prefix of 19 ends mid-block
    (48, 16),  # prefix of 32 ends on a block boundary
    (16, 1),  # decode, context exactly one block
    (70, 70),  # several query tiles
    (0, 1),  # a CUDA-graph padding row
]


def test_reference_matches_dense_sdpa():
    batch = Batch(MIXED, heads=6, kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32)
    ref = batch.run(paged_attention_reference)
    starts = batch.meta["query_start_loc"].tolist()
    for i, (seq_len, q_len) in enumerate(batch.seqs):
        rows = slice(starts[i], starts[i + 1])
        if seq_len == 0:
            assert ref[rows].eq(0).all()
            continue
        pos = torch.arange(seq_len - q_len, seq_len)
        mask = torch.arange(seq_len)[None, :] <= pos[:, None]
        dense = F.scaled_dot_product_attention(
            batch.q[rows].transpose(0, 1),
            batch.keys[i].transpose(0, 1),
            batch.values[i].transpose(0, 1),
            attn_mask=mask,
            scale=batch.meta["scale"],
            enable_gqa=True,
        ).transpose(0, 1)
        torch.testing.assert_close(ref[rows], dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size,dtype",
    [
        (4, 4, 16, 16, torch.float32),  # MHA
        (9, 3, 32, 16, torch.float32),  # SmolLM2's ratio
        (8, 2, 64, 32, torch.float32),
        (8, 1, 128, 16, torch.float32),
        (7, 1, 16, 8, torch.float32),  # Qwen2.5-7B's ratio
        (6, 2, 80, 16, torch.float32),  # head_dim not a power of two
        (6, 2, 16, 16, torch.bfloat16),
        (8, 2, 128, 32, torch.bfloat16),
    ],
)
def test_mixed_batch_matches_reference(heads, kv_heads, head_dim, block_size, dtype):
    batch = Batch(
        MIXED, heads=heads, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
        dtype=dtype,
    ).to(DEVICE)  # fmt: skip
    out = batch.run(paged_attention)
    ref = batch.run(paged_attention_reference)
    assert out.isfinite().all()
    assert out[-1].eq(0).all()  # the padding row
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_with_decodes_launched_apart(dtype):
    """`num_decodes`: the leading decodes get their own launch; the prefills' tiles then
    start at a query row other than 0."""
    decodes = [(3 + 7 * i, 1) for i in range(24)] + [(0, 1)]  # more rows than a query tile
    seqs = [*decodes, (49, 30), (21, 21), (5, 1)]
    batch = Batch(seqs, heads=3, kv_heads=1, head_dim=16, block_size=16, dtype=dtype).to(DEVICE)
    ref = batch.run(paged_attention_reference)
    rtol, atol = TOL[dtype]
    for num_decodes in (25, 20):  # 20: decodes left among the prefills are fine too
        out = batch.run(paged_attention, num_decodes=num_decodes)
        assert out[24].eq(0).all()
        torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_split_k_matches_unsplit(dtype):
    seqs = [(1, 1), (65, 1), (250, 1), (0, 1), (129, 1)]
    batch = Batch(seqs, heads=4, kv_heads=1, head_dim=32, block_size=16, dtype=dtype).to(DEVICE)
    ref = batch.run(paged_attention_reference)
    whole = batch.run(paged_attention)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(whole, ref, rtol=rtol, atol=atol)
    for splits in (4, 7):  # 7: some splits of the short contexts get no tiles at all
        split = batch.run(paged_attention, num_splits=splits)
        assert split[3].eq(0).all()
        torch.testing.assert_close(split, ref, rtol=rtol, atol=atol)
        torch.testing.assert_close(split, whole, rtol=rtol, atol=atol)


def test_strided_query_and_padding_only_batch():
    batch = Batch([(40, 3), (0, 2), (17, 17)], heads=4, kv_heads=2, head_dim=16, block_size=16,
                  dtype=torch.float32).to(DEVICE)  # fmt: skip
    fused = torch.randn(batch.q.shape[0], 8, 16, device=DEVICE)  # q is half a fused tensor
    q = fused[:, 2:6]
    out = batch.run(paged_attention, q=q)
    torch.testing.assert_close(out, batch.run(paged_attention_reference, q=q))
    assert out[3:5].eq(0).all()
    pad = Batch([(0, 1)] * 3, heads=4, kv_heads=2, head_dim=16, block_size=16,
                dtype=torch.float32).to(DEVICE)  # fmt: skip
    for splits in (1, 3):
        assert pad.run(paged_attention, num_splits=splits).eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["fused", "transposed"])
def test_store_kv_strided_and_skipping_negative_slots(dtype, layout):
    tokens, heads, kv_heads, head_dim, block_size = 6, 4, 2, 16, 8
    if layout == "fused":  # k, v split off a fused qkv projection: rows strided
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
        _, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        k = k.view(tokens, kv_heads, head_dim)
        v = v.view(tokens, kv_heads, head_dim)
    else:  # head_dim not the innermost dimension
        k, v = torch.randn(2, tokens, head_dim, kv_heads, device=DEVICE).to(dtype).transpose(2, 3)
    assert not k.is_contiguous()
    shape = (5, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    slots = torch.tensor([3, 17, -1, 8, 39, -1], dtype=torch.int32, device=DEVICE)
    store_kv(k, v, k_cache, v_cache, slots)
    want_k = torch.full(shape, float("nan"), dtype=dtype).flatten(0, 1)
    want_v = want_k.clone()
    keep = slots.cpu() >= 0
    want_k[slots.cpu()[keep].long()] = k.cpu()[keep]
    want_v[slots.cpu()[keep].long()] = v.cpu()[keep]
    torch.testing.assert_close(k_cache.cpu().flatten(0, 1), want_k, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(v_cache.cpu().flatten(0, 1), want_v, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_store_kv_is_rope_then_store(dtype):
    """The fused launch equals RoPE then the plain store: q rotated in place
    (padding rows too), rotated k and untouched v in their slots, padding slots left alone."""
    tokens, heads, kv_heads, head_dim, block_size = 6, 8, 2, 64, 8
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k, v = (x.view(tokens, -1, head_dim) for x in (q, k, v))
    positions = torch.tensor([0, 5, 900, 17, 1023, 3], device=DEVICE)
    freqs = torch.outer(torch.arange(1024.0), 1e4 ** -(torch.arange(0, head_dim, 2) / head_dim))
    table = torch.cat([freqs.cos(), freqs.sin()], -1).to(DEVICE)
    slots = torch.tensor([3, 17, -1, 8, 39, -1], dtype=torch.int32, device=DEVICE)
    shape = (5, block_size, kv_heads, head_dim)
    caches = [torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) for _ in range(4)]
    ref_q, ref_k = q.clone(), k.clone()
    _rope_float32(ref_q, positions, table)
    _rope_float32(ref_k, positions, table)
    store_kv(ref_k, v, caches[0], caches[1], slots)
    k0 = k.clone()
    rope_store_kv(q, k, v, caches[2], caches[3], slots, positions, table)
    assert torch.equal(k, k0)  # k itself is not written
    # One rounding step apart at most: the interpreter's float32 -> bfloat16 cast truncates
    # where torch rounds, and a GPU may fuse the products into FMAs.
    rtol = 2**-7 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(q, ref_q, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(caches[2], caches[0], rtol=rtol, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(caches[3], caches[1], rtol=0, atol=0, equal_nan=True)


def _rope_float32(x, positions, table):
    """The kernels' numerics: rotate in float32 with float32 cos/sin, round once."""
    cos, sin = table[positions].unsqueeze(1).chunk(2, dim=-1)
    x1, x2 = x.float().chunk(2, dim=-1)
    x.copy_(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype))


def test_store_then_attend_round_trip():
    """The runner's order: store this step's K/V, then attend over the cache that holds them."""
    batch = Batch([(20, 5), (9, 1)], heads=4, kv_heads=2, head_dim=16, block_size=8,
                  dtype=torch.float32).to(DEVICE)  # fmt: skip
    ref = batch.run(paged_attention_reference)
    slots, k_new, v_new = [], [], []
    for i, (seq_len, q_len) in enumerate(batch.seqs):
        for p in range(seq_len - q_len, seq_len):
            slots.append(int(batch.block_tables[i, p // 8]) * 8 + p % 8)
            k_new.append(batch.keys[i][p])
            v_new.append(batch.values[i][p])
    flat = torch.tensor(slots, device=DEVICE)
    batch.k_cache.flatten(0, 1)[flat] = float("nan")  # forget the new tokens...
    batch.v_cache.flatten(0, 1)[flat] = float("nan")
    store_kv(torch.stack(k_new).to(DEVICE), torch.stack(v_new).to(DEVICE), batch.k_cache,
             batch.v_cache, flat.to(torch.int32))  # fmt: skip
    torch.testing.assert_close(batch.run(paged_attention), ref)  # ...and store them again


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_with_new_kv_is_rope_store_then_attend(dtype, splits):
    """A decode step given unrotated q, k and v: the one launch leaves the caches as
    `rope_store_kv` does and attends as the store-then-attend pair, padding rows included."""
    seqs = [(37, 1), (1, 1), (250, 1), (0, 1), (16, 1)]
    heads, kv_heads, head_dim, block = 4, 2, 32, 16
    batch = Batch(seqs, heads=heads, kv_heads=kv_heads, head_dim=head_dim, block_size=block,
                  dtype=dtype).to(DEVICE)  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    k, v = (torch.randn(len(seqs), kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
            for _ in range(2))  # fmt: skip
    positions = torch.tensor([max(s - 1, 0) for s, _ in seqs], device=DEVICE)
    slots = [int(batch.block_tables[i, (s - 1) // block]) * block + (s - 1) % block if s else -1
             for i, (s, _) in enumerate(seqs)]  # fmt: skip
    slots = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    freqs = torch.outer(torch.arange(512.0), 1e4 ** -(torch.arange(0, head_dim, 2) / head_dim))
    table = torch.cat([freqs.cos(), freqs.sin()], -1).to(DEVICE)
    caches = (batch.k_cache.clone(), batch.v_cache.clone())
    q = batch.q.clone()
    rope_store_kv(q, k, v, *caches, slots, positions, table)
    want = paged_attention(q, *caches, torch.empty_like(q), **batch.meta, num_splits=splits)
    got = batch.run(paged_attention, num_splits=splits,
                    new_kv=NewKV(k, v, slots, positions, table))  # fmt: skip
    # A GPU may contract the rotation's products into FMAs differently: one rounding apart.
    rtol = 2**-7 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(batch.k_cache, caches[0], rtol=rtol, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(batch.v_cache, caches[1], rtol=0, atol=0, equal_nan=True)
    assert got[3].eq(0).all()
    torch.testing.assert_close(got, want, rtol=TOL[dtype][0], atol=TOL[dtype][1])
    with pytest.raises(ValueError, match="decode-only"):
        batch.run(paged_attention, max_query_len=2, new_kv=NewKV(k, v, slots, positions, table))


def test_choose_num_splits():
    assert choose_num_splits(256, 8, 200, 132) == 1  # a full batch needs no split
    assert choose_num_splits(1, 8, 200, 132) == 1  # short context
    assert choose_num_splits(1, 8, 32768, 132) == 16
    assert 1 < choose_num_splits(4, 8, 4096, 132) <= 8  # each split keeps >= 512 tokens
    # Each factor is a kernel variant to compile: only powers of two occur.
    factors = {choose_num_splits(b, 8, n, 132) for b in range(1, 40) for n in range(1, 40000, 97)}
    assert factors == {1, 2, 4, 8, 16}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("splits", [1, 3])
def test_cuda_graph_replay_reads_new_metadata(splits):
    """A captured launch must follow the values of its metadata tensors, not bake them in."""
    seqs = [(40, 1), (17, 1), (0, 1), (100, 1)]
    batch = Batch(seqs, heads=8, kv_heads=2, head_dim=64, block_size=16,
                  dtype=torch.bfloat16).to(DEVICE)  # fmt: skip
    out = torch.zeros_like(batch.q)

    def step():
        paged_attention(batch.q, batch.k_cache, batch.v_cache, out, **batch.meta,
                        num_splits=splits)  # fmt: skip

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    batch.meta["seq_lens"].copy_(torch.tensor([90, 33, 17, 0], dtype=torch.int32))
    batch.meta["block_tables"].copy_(batch.meta["block_tables"].roll(1, 0))
    batch.q.normal_()
    graph.replay()
    torch.cuda.synchronize()
    ref = batch.run(paged_attention_reference)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
