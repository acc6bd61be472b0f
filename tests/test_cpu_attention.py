"""The CPU decode-attention kernel (`tandem.engine.cpu_kernels`) against torch's padded SDPA
path, which it replaces on CPU: GQA ratios, head dims with and without code of their own,
block sizes, scattered blocks, partial last blocks, strided queries, both dtypes."""

import pytest
import torch

from tandem.engine import cpu_kernels
from tandem.engine.attention import AttentionMetadata, TorchAttention


def _case(lens, heads, kv_heads, dim, block, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    widths = [-(-n // block) for n in lens]
    num_blocks = sum(widths) + 3
    shape = (num_blocks, block, kv_heads, dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    order = torch.randperm(num_blocks - 1, generator=gen)[: sum(widths)] + 1  # scattered
    tables = torch.zeros((len(lens), max(widths)), dtype=torch.int32)
    at = 0
    for i, w in enumerate(widths):
        tables[i, :w] = order[at : at + w]
        at += w
    # Decode rows sit among other rows (a mixed batch), and q is a view of a fused qkv.
    rows = torch.arange(len(lens), dtype=torch.int32) * 2 + 1
    fused = torch.randn(2 * len(lens) + 1, (heads + 2 * kv_heads) * dim, generator=gen)
    q = fused.to(dtype)[:, : heads * dim].view(-1, heads, dim)
    lens = torch.tensor(lens, dtype=torch.int32)
    meta = AttentionMetadata(torch.zeros(0), [], rows, tables, lens, int(lens.max()), None)
    return q, k_cache, v_cache, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block"),
    [(4, 4, 64, 16), (9, 3, 64, 16), (8, 2, 128, 16), (16, 2, 80, 32), (8, 1, 32, 8),
     (120, 5, 64, 16)],  # the last: more query heads than one work item holds
)
def test_kernel_matches_padded_sdpa(dtype, heads, kv_heads, dim, block):
    lib = cpu_kernels.library()
    lens = [1, block - 1, block, block + 1, 5 * block + 3, 300]
    q, k_cache, v_cache, meta = _case(lens, heads, kv_heads, dim, block, dtype)
    assert cpu_kernels.supports(lib, q, k_cache)
    scale = dim**-0.5
    want = torch.full_like(q, 7.0)
    TorchAttention(k_cache[None], v_cache[None], scale).padded_decode(
        q, k_cache, v_cache, want, meta
    )
    got = torch.full_like(q, 7.0)
    cpu_kernels.decode_attention(lib, q, k_cache, v_cache, got, meta.decode_rows,
                                   meta.decode_blocks, meta.decode_lens, scale)  # fmt: skip
    rows = meta.decode_rows.long()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got[rows].float(), want[rows].float(), atol=tol, rtol=tol)
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[rows] = False
    assert (got[others] == 7.0).all()  # rows that do not decode are left alone


@pytest.mark.parametrize("lens", [[40, 7, 129, 64] * 4, [700]])  # one long: heads split
def test_threads_give_the_same_answer(lens):
    lib = cpu_kernels.library()
    q, k_cache, v_cache, meta = _case(lens, 8, 2, 64, 16, torch.bfloat16)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = torch.zeros_like(q)
            cpu_kernels.decode_attention(lib, q, k_cache, v_cache, out, meta.decode_rows,
                                           meta.decode_blocks, meta.decode_lens, 0.125)  # fmt: skip
            outs.append(out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_cpu_backend_uses_the_kernel_and_float16_keeps_sdpa():
    cache = torch.zeros(1, 4, 16, 2, 64)
    assert TorchAttention(cache, cache, 0.125).kernel is not None
    q = torch.zeros(1, 4, 64, dtype=torch.float16)
    assert not cpu_kernels.supports(cpu_kernels.library(), q, cache[0].half())


def test_a_compiler_that_fails_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(cpu_kernels.KernelUnavailable, match="false failed"):
        cpu_kernels._build("false")
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built is left to load
