"""The fused Triton kernels against their torch twins, and the twins against Hugging Face.

On a machine without a GPU the kernels run under Triton's interpreter. Its float32 ->
bfloat16 cast truncates where a GPU rounds to nearest even, so bfloat16 results are checked to
within a rounding step there and exactly only on a GPU; float16 casts round correctly in both.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":  # must precede the kernels' definition (tests/conftest.py sets it too)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tandem.engine.kernels import fused  # noqa: E402

# In CI a missing triton is a failure, not a skip.
needs_triton = pytest.mark.skipif(
    not fused.HAS_TRITON and os.environ.get("CI") != "true", reason="triton is not installed"
)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = ["f32", "bf16", "f16"]
NAMES = dict(zip(DTYPES, DTYPE_IDS, strict=True))
EPS = 1e-6


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def assert_mostly_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-equal but for the rare element where a float32 last-bit difference (reduction
    order, exp's approximation) flips a rounding: tells one rounding from two, which a
    tolerance of an ulp cannot."""
    assert (actual != expected).float().mean().item() < 0.02


def exact_casts(dtype: torch.dtype) -> bool:
    """Whether the kernel's float32 -> dtype casts round as torch's do here."""
    return dtype != torch.bfloat16 or DEVICE == "cuda"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed)) * scale).to(DEVICE, dtype)


def rope_table(max_positions: int, head_dim: int) -> torch.Tensor:
    """rope_cos_sin's layout: [max_positions, head_dim], cos then sin."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)


# --------------------------------------------------------------------------- RMSNorm


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("tokens", "hidden"), [(1, 576), (37, 576), (1, 8192), (4, 8192)])
def test_rms_norm_matches_twin(dtype: torch.dtype, hidden: int, tokens: int) -> None:
    x = randn(tokens, hidden, dtype=dtype, seed=1, scale=3.0)
    weight = randn(hidden, dtype=dtype, seed=2)
    residual = randn(tokens, hidden, dtype=dtype, seed=3)
    # The twin's two roundings are the kernel's; only rstd's last bit may differ (and under the
    # interpreter bfloat16 casts truncate), so a couple of ulps in reduced precision.
    rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else (3 * ulp(dtype), 1e-5)

    out = fused.rms_norm(x, weight, EPS)
    ref = fused.rms_norm_torch(x, weight, EPS)
    assert_close(out, ref, rtol, atol)
    reduced = dtype != torch.float32 and exact_casts(dtype)
    if reduced:  # Hugging Face's order: round the normalised row, then scale
        assert_mostly_equal(out, ref)

    out, new_residual = fused.rms_norm(x, weight, EPS, residual)
    ref, ref_residual = fused.rms_norm_torch(x, weight, EPS, residual)
    assert_close(out, ref, rtol, atol)
    if reduced:  # normalises the rounded sum, as the twin does
        assert_mostly_equal(out, ref)
    if exact_casts(dtype):  # one add, rounded once: bit for bit
        assert torch.equal(new_residual, ref_residual)
    else:
        assert_close(new_residual, ref_residual, ulp(dtype), 0.0)
    assert new_residual.data_ptr() not in (x.data_ptr(), residual.data_ptr())


@needs_triton
@pytest.mark.parametrize("parts", [1, 3])
def test_rms_norm_sums_a_linears_partial_sums_first(parts: int) -> None:
    """A split-K linear's float32 parts: the kernel adds them, rounds once to the residual's
    dtype and goes on as with that linear's output; without a residual it refuses them."""
    from tandem.engine.kernels.skinny_linear import PartialSums

    split = PartialSums(randn(parts, 5, 576, dtype=torch.float32, seed=4))
    residual = randn(5, 576, dtype=torch.float16, seed=5)
    weight = randn(576, dtype=torch.float16, seed=6)
    out, new_residual = fused.rms_norm(split, weight, EPS, residual)
    ref, ref_residual = fused.rms_norm_torch(split.total(torch.float16), weight, EPS, residual)
    assert_mostly_equal(new_residual, ref_residual)  # the parts' sum order may differ
    assert_mostly_equal(out, ref)
    assert fused.rms_norm_torch(split, weight, EPS, residual)[1].equal(ref_residual)
    with pytest.raises(ValueError, match="partial sums need the residual"):
        fused.rms_norm(split, weight, EPS)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_rms_norm_per_head_on_strided_view(dtype: torch.dtype) -> None:
    """Qwen3's q/k norm: rows of head_dim inside a view of the fused qkv output."""
    tokens, heads, kv_heads, head_dim = 5, 4, 2, 128
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=4)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    assert q.stride(0) == qkv.shape[1]
    weight = randn(head_dim, dtype=dtype, seed=5)
    before = qkv.clone()
    eps = 0.1  # large enough to matter
    out = fused.rms_norm(q, weight, eps)
    rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else (3 * ulp(dtype), 1e-5)
    assert_close(out, fused.rms_norm_torch(q, weight, eps), rtol, atol)
    assert torch.equal(qkv, before)


# --------------------------------------------------------------------------- rotary embedding


def rotary_embedding(q, k, positions, table):
    """RoPE through the engine's fused kernel (`rope_store_kv`): q in place, k read back from
    the cache it was stored in (one slot per token). No host sync: it runs in graph capture."""
    from tandem.engine.kernels.kv_store import rope_store_kv

    tokens, kv_heads, head_dim = k.shape
    k_cache = torch.full((tokens, 1, kv_heads, head_dim), float("nan"), dtype=k.dtype,
                         device=k.device)  # fmt: skip
    v_cache = k_cache.clone()
    v = torch.randn(k.shape, device=k.device).to(k.dtype)
    slots = torch.arange(tokens, dtype=torch.int32, device=k.device)
    rope_store_kv(q, k, v, k_cache, v_cache, slots, positions, table)
    k.copy_(k_cache[:, 0])
    return q, k


def fused_qkv_views(
    tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [T, (H + 2 KV) * D] and its q, k, v views, as the model's split/view makes them."""
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=seed)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return (
        qkv,
        q.view(tokens, heads, head_dim),
        k.view(tokens, kv_heads, head_dim),
        v.view(tokens, kv_heads, head_dim),
    )


ROPE_CASES = [
    (dtype, *heads, tokens)
    for dtype in DTYPES
    for heads in [(4, 2, 16), (8, 2, 64), (4, 4, 128), (6, 2, 80)]  # 80: a half to mask
    for tokens in (1, 37)
    # The interpreter is slow: 37 tokens in every head shape for float32 only.
    if tokens == 1 or dtype == torch.float32 or heads[2] in (64, 80)
]


@needs_triton
@pytest.mark.parametrize(
    ("dtype", "heads", "kv_heads", "head_dim", "tokens"),
    [
        pytest.param(*case, id="-".join([NAMES[case[0]], *map(str, case[1:])]))
        for case in ROPE_CASES
    ],
)
def test_rotary_embedding_on_fused_qkv_views(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, tokens: int
) -> None:
    max_positions = 4096
    table = rope_table(max_positions, head_dim)
    index_dtype = torch.int32 if tokens % 2 else torch.int64
    positions = torch.randint(0, max_positions, (tokens,), generator=gen(6)).to(index_dtype)
    positions[0] = max_positions - 1  # the table's last row, far from position 0
    positions = positions.to(DEVICE)
    qkv, q, k, v = fused_qkv_views(tokens, heads, kv_heads, head_dim, dtype, seed=7)
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    assert tokens == 1 or q.stride(0) == k.stride(0) == qkv.shape[1]  # rows of the fused qkv
    q0, k0, v0 = q.clone(), k.clone(), v.clone()

    out_q, out_k = rotary_embedding(q, k, positions, table)
    assert out_q is q and out_k is k
    assert torch.equal(v, v0)

    # The kernel rounds once from float32: it is the float32 twin, rounded.
    ideal_q, ideal_k = fused.rotary_embedding_torch(q0.float(), k0.float(), positions, table)
    if dtype == torch.float32:
        assert_close(q, ideal_q, 1e-6, 1e-6)
        assert_close(k, ideal_k, 1e-6, 1e-6)
    else:
        rtol = ulp(dtype) * (1 if exact_casts(dtype) else 2)
        assert_close(q, ideal_q.to(dtype), rtol, 1e-5)
        assert_close(k, ideal_k.to(dtype), rtol, 1e-5)
        if exact_casts(dtype):
            assert_mostly_equal(q, ideal_q.to(dtype))
            assert_mostly_equal(k, ideal_k.to(dtype))
        # The twin, like the model, rounds cos/sin and each product: a few ulps away.
        twin_q, twin_k = fused.rotary_embedding_torch(q0.clone(), k0.clone(), positions, table)
        assert_close(q, twin_q, 6 * ulp(dtype), 1e-2)
        assert_close(k, twin_k, 6 * ulp(dtype), 1e-2)


@needs_triton
def test_rotary_embedding_many_heads_and_contiguous_inputs() -> None:
    """More heads than one block holds (the head loop), on separate contiguous q and k."""
    tokens, heads, kv_heads, head_dim = 3, 40, 8, 128
    table = rope_table(64, head_dim)
    positions = torch.tensor([0, 17, 63], device=DEVICE)
    q = randn(tokens, heads, head_dim, dtype=torch.float32, seed=8)
    k = randn(tokens, kv_heads, head_dim, dtype=torch.float32, seed=9)
    ref_q, ref_k = fused.rotary_embedding_torch(q.clone(), k.clone(), positions, table)
    rotary_embedding(q, k, positions, table)
    assert_close(q, ref_q, 1e-6, 1e-6)
    assert_close(k, ref_k, 1e-6, 1e-6)
    # Position 0 rotates by nothing.
    assert torch.equal(q[0], randn(tokens, heads, head_dim, dtype=torch.float32, seed=8)[0])


# --------------------------------------------------------------------------- SiLU and mul


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("tokens", "inter"), [(1, 64), (37, 1000), (3, 2500)])  # 2500: 3 blocks
def test_silu_and_mul_matches_twin(dtype: torch.dtype, inter: int, tokens: int) -> None:
    x = randn(tokens, 2 * inter, dtype=dtype, seed=10, scale=4.0)
    out = fused.silu_and_mul(x)
    assert out.shape == (tokens, inter)
    if dtype == torch.float32:
        assert_close(out, fused.silu_and_mul_torch(x), 1e-6, 1e-6)
        return
    # One rounding from float32, where the twin rounds after silu and again after the product.
    rtol = ulp(dtype) * (1 if exact_casts(dtype) else 2)
    ideal = fused.silu_and_mul_torch(x.float()).to(dtype)
    assert_close(out, ideal, rtol, 1e-5)
    if exact_casts(dtype):
        assert_mostly_equal(out, ideal)
    assert_close(out, fused.silu_and_mul_torch(x), 3 * ulp(dtype), 1e-5)


# --------------------------------------------------------------------------- shapes, graphs


@needs_triton
def test_empty_batches_launch_nothing() -> None:
    x = torch.empty(0, 576, device=DEVICE)
    weight = torch.ones(576, device=DEVICE)
    assert fused.rms_norm(x, weight, EPS).shape == (0, 576)
    out, res = fused.rms_norm(x, weight, EPS, x)
    assert out.shape == res.shape == (0, 576)
    assert fused.silu_and_mul(torch.empty(0, 128, device=DEVICE)).shape == (0, 64)
    q, k = torch.empty(0, 4, 16, device=DEVICE), torch.empty(0, 2, 16, device=DEVICE)
    positions = torch.empty(0, dtype=torch.long, device=DEVICE)
    rotary_embedding(q, k, positions, rope_table(8, 16))


@needs_triton
@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_kernels_replay_in_a_cuda_graph() -> None:
    """Captured once, replayed on new inputs: grids come from shapes, nothing syncs."""
    dtype, tokens, hidden, inter = torch.bfloat16, 8, 576, 1536
    heads, kv_heads, head_dim = 9, 3, 64
    x = randn(tokens, hidden, dtype=dtype, seed=11)
    residual = randn(tokens, hidden, dtype=dtype, seed=12)
    weight = randn(hidden, dtype=dtype, seed=13)
    gate_up = randn(tokens, 2 * inter, dtype=dtype, seed=14)
    _, q, k, _ = fused_qkv_views(tokens, heads, kv_heads, head_dim, dtype, seed=15)
    positions = torch.arange(tokens, device=DEVICE)
    table = rope_table(128, head_dim)

    def step() -> tuple[torch.Tensor, ...]:
        normed, new_residual = fused.rms_norm(x, weight, EPS, residual)
        rotary_embedding(q, k, positions, table)
        return normed, new_residual, fused.silu_and_mul(gate_up)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (16, 17):
        x.copy_(randn(tokens, hidden, dtype=dtype, seed=seed))
        gate_up.copy_(randn(tokens, 2 * inter, dtype=dtype, seed=seed + 10))
        positions.copy_(torch.randint(0, 128, (tokens,), generator=gen(seed)).to(DEVICE))
        q0, k0 = q.clone(), k.clone()
        graph.replay()
        torch.cuda.synchronize()
        ref_normed, ref_residual = fused.rms_norm_torch(x, weight, EPS, residual)
        assert torch.equal(outs[1], ref_residual)
        assert_close(outs[0], ref_normed, 3 * ulp(dtype), 1e-5)
        assert_close(outs[2], fused.silu_and_mul_torch(gate_up), 3 * ulp(dtype), 1e-5)
        ref_q, ref_k = fused.rotary_embedding_torch(q0.float(), k0.float(), positions, table)
        assert_close(q, ref_q.to(dtype), ulp(dtype), 1e-5)
        assert_close(k, ref_k.to(dtype), ulp(dtype), 1e-5)


# --------------------------------------------------------------------------- twins vs HF


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_twins_match_hugging_face_bit_for_bit(dtype: torch.dtype) -> None:
    """The twins are the CPU path: they must be exactly Hugging Face's Llama numerics."""
    from transformers.activations import ACT2FN
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    tokens, hidden, heads, kv_heads, head_dim = 7, 576, 9, 3, 64
    x = randn(tokens, hidden, dtype=dtype, seed=20, scale=3.0)
    residual = randn(tokens, hidden, dtype=dtype, seed=21)
    norm = LlamaRMSNorm(hidden, eps=1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(randn(hidden, dtype=dtype, seed=22))
        hf_sum = residual + x
        hf_normed = norm(hf_sum)
    normed, new_residual = fused.rms_norm_torch(x, norm.weight.detach(), 1e-5, residual)
    assert torch.equal(new_residual, hf_sum)
    assert torch.equal(normed, hf_normed)
    assert torch.equal(fused.rms_norm_torch(x, norm.weight.detach(), 1e-5), norm(x).detach())

    table = rope_table(256, head_dim)
    positions = torch.tensor([0, 1, 5, 100, 200, 254, 255], device=DEVICE)
    _, q, k, _ = fused_qkv_views(tokens, heads, kv_heads, head_dim, dtype, seed=23)
    half_cos, half_sin = table[positions].chunk(2, dim=-1)
    # Hugging Face's rotary embedding: cat(freqs, freqs), cos/sin cast to the model dtype.
    cos = torch.cat([half_cos, half_cos], dim=-1).to(dtype)
    sin = torch.cat([half_sin, half_sin], dim=-1).to(dtype)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    twin_q, twin_k = fused.rotary_embedding_torch(q, k, positions, table)
    assert torch.equal(twin_q, hf_q) and torch.equal(twin_k, hf_k)

    gate_up = randn(tokens, 2 * 1000, dtype=dtype, seed=24, scale=4.0)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(fused.silu_and_mul_torch(gate_up), ACT2FN["silu"](gate) * up)
