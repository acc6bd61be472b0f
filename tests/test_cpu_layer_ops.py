"""The CPU layer-glue kernels (`tandem.engine.cpu_kernels`: residual add with RMSNorm, RoPE with
the KV store, SiLU-and-mul) against the torch ops they replace: the same bits in bfloat16,
within float32 rounding in float32."""

from __future__ import annotations

import pytest
import torch

from tandem.engine import cpu_kernels
from tandem.engine.kernels.fused import rms_norm_torch, silu_and_mul_torch
from tandem.engine.models.llama import apply_rope

DTYPES = [torch.bfloat16, torch.float32]


def same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit in bfloat16; in float32 the sums may be ordered differently."""
    if got.dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


@pytest.fixture(scope="module")
def lib():
    return cpu_kernels.library()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 300])  # 300 rows: split over threads
@pytest.mark.parametrize("threads", [1, 2])
def test_add_rms_norm_matches_torch(lib, dtype, rows, threads):
    torch.manual_seed(rows)
    x, residual = torch.randn(2, rows, 576, dtype=dtype) * 3
    weight = torch.randn(576, dtype=dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        alone = cpu_kernels.add_rms_norm(lib, x.clone(), weight, 1e-5)
        same(alone, rms_norm_torch(x, weight, 1e-5))
        want, want_sum = rms_norm_torch(x, weight, 1e-5, residual)
        summed = x.clone()
        got, got_sum = cpu_kernels.add_rms_norm(lib, summed, weight, 1e-5, residual)
    finally:
        torch.set_num_threads(before)
    same(got, want)
    assert got_sum is summed and torch.equal(got_sum, want_sum)  # the sum lands in x


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_reads_strided_rows(lib, dtype):
    wide = torch.randn(4, 1000, dtype=dtype)
    x = wide[:, :576]  # rows 1000 apart
    weight = torch.randn(576, dtype=dtype)
    same(cpu_kernels.add_rms_norm(lib, x, weight, 1e-6), rms_norm_torch(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_silu_and_mul_matches_torch(lib, dtype, rows):
    torch.manual_seed(rows)
    x = torch.randn(rows, 2 * 1536, dtype=dtype) * 4
    x[0, :8] = torch.tensor([0.0, -0.0, 90.0, -90.0, 1e-3, -1e-3, 20.0, -20.0])  # the edges
    same(cpu_kernels.silu_and_mul(lib, x), silu_and_mul_torch(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 200])
@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 128), (8, 1, 32)])
def test_rope_store_rotates_in_place_and_stores_at_the_slots(lib, dtype, tokens, heads):
    num_heads, num_kv_heads, dim = heads
    torch.manual_seed(tokens)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * dim, dtype=dtype)
    sizes = [num_heads * dim, num_kv_heads * dim, num_kv_heads * dim]

    def views(t):  # strided views of a fused projection, as the model has them
        q, k, v = t.split(sizes, dim=-1)
        return q.view(tokens, num_heads, dim), k.view(tokens, -1, dim), v.view(tokens, -1, dim)

    q, k, v = views(qkv)
    table = torch.randn(tokens, dim, dtype=dtype)  # each token's [cos | sin]
    cos, sin = table.unsqueeze(1).chunk(2, dim=-1)
    k_cache = torch.zeros(40, 16, num_kv_heads, dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(40 * 16)[:tokens]
    q2, k2, v2 = views(qkv.clone())
    cpu_kernels.rope_store(lib, q2, k2, v2, table, k_cache, v_cache, slots)
    same(q2, apply_rope(q, cos, sin))
    same(k2, apply_rope(k, cos, sin))
    assert torch.equal(v2, v)  # values are stored, not rotated
    assert torch.equal(k_cache.flatten(0, 1)[slots], k2)
    assert torch.equal(v_cache.flatten(0, 1)[slots], v)
    untouched = torch.ones(40 * 16, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache.flatten(0, 1)[untouched].any() and not v_cache.flatten(0, 1)[untouched].any()


def test_the_cpu_engine_runs_its_layers_through_the_kernels(tiny_llama):
    """Built on CPU, every norm, attention and MLP module holds the library; outputs still
    match transformers (tests/test_engine_vs_hf.py checks that token for token)."""
    from tandem.engine.config import EngineConfig
    from tandem.engine.core import EngineCore

    core = EngineCore(EngineConfig(model=str(tiny_llama), dtype="bfloat16"))
    model = core.runner.model
    assert model.cpu_kernels is not None
    holders = [m for m in model.modules() if hasattr(m, "cpu_kernels")]
    assert all(m.cpu_kernels is model.cpu_kernels for m in holders) and len(holders) > 3
