"""The skinny Triton linear against torch's matmul, and the model's use of it.

On a machine without a GPU the kernel runs under Triton's interpreter, in float16 (the
interpreter multiplies bfloat16 as raw bits); on a GPU in bfloat16 too.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":  # must precede the kernel's definition (tests/conftest.py sets it too)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tandem.engine.kernels import skinny_linear as sl  # noqa: E402

DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.skipif(sl.triton is None and os.environ.get("CI") != "true", reason="no triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 5, 16, 33, 64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("config", [None, (32, 128, 4, 2)])
def test_matches_matmul(dtype: torch.dtype, rows: int, bias: bool, config) -> None:
    """Ragged shapes (features and K not multiples of the tiles) take the masked edges."""
    gen = torch.Generator().manual_seed(rows)
    n, k = (200, 520) if DEVICE == "cpu" else (6144, 4096)
    x = torch.randn(rows, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    got = sl.skinny_linear(x, w, bias=b, config=config)
    want = x.float() @ w.float().T + (b.float() if bias else 0.0)
    assert got.dtype == dtype and got.shape == (rows, n)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_linear_falls_back_where_the_kernel_does_not_apply() -> None:
    """float32, many rows or a CPU tensor go to F.linear: results equal to the bit."""
    x = torch.randn(sl.MAX_ROWS + 1, 64)
    w = torch.randn(32, 64)
    assert torch.equal(sl.linear(x, w, None), torch.nn.functional.linear(x, w))
    assert torch.equal(sl.linear(x[:2], w, None), torch.nn.functional.linear(x[:2], w))


@pytest.mark.skipif(DEVICE != "cuda", reason="the model takes the kernel on CUDA only")
def test_fused_model_linears_match_torch() -> None:
    """A decode-sized batch through a fused Llama layer's linears equals F.linear's to
    bf16 rounding."""
    from tandem.engine.models.llama import Linear

    layer = Linear(4096, 14336 * 2, bias=False).to(DEVICE, torch.bfloat16)
    x = torch.randn(8, 4096, device=DEVICE, dtype=torch.bfloat16)
    want = layer(x)
    layer.fused = True
    got = layer(x)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(sl.triton is None and os.environ.get("CI") != "true", reason="no triton")
@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("rows", [17, 64])
def test_split_k_partial_sums_add_up_to_the_matmul(splits: int, rows: int) -> None:
    """K cut in pieces, the last one short: the float32 parts sum to x @ W.T."""
    gen = torch.Generator().manual_seed(splits)
    n, k = (96, 520) if DEVICE == "cpu" else (4096, 14336)
    x = torch.randn(rows, k, generator=gen).to(DEVICE, torch.float16)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE, torch.float16)
    parts = sl.skinny_linear(x, w, config=(32, 128, 4, 2), splits=splits)
    assert parts.dtype == torch.float32 and parts.shape == (splits, rows, n)
    torch.testing.assert_close(parts.sum(0), x.float() @ w.float().T, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(sl.triton is None and os.environ.get("CI") != "true", reason="no triton")
@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("rows", [17, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_summed_split_k_is_the_parts_added_in_order(splits: int, rows: int, bias: bool) -> None:
    """The last split of each tile adds the parts in split order: the result is exactly the
    parts' sum (plus bias) rounded once, every time, and the tile counters end at zero."""
    gen = torch.Generator().manual_seed(rows + splits)
    n, k = (200, 520) if DEVICE == "cpu" else (6144, 4096)
    x = torch.randn(rows, k, generator=gen).to(DEVICE, torch.float16)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE, torch.float16)
    b = torch.randn(n, generator=gen).to(DEVICE, torch.float16) if bias else None
    config = (32, 128, 4, 2)
    parts = sl.skinny_linear(x, w, config=config, splits=splits)
    want = torch.zeros_like(parts[0])
    for part in parts:
        want += part
    want = (want + (b.float() if bias else 0.0)).to(torch.float16)
    for _ in range(3):
        got = sl.skinny_linear(x, w, bias=b, config=config, splits=splits, summed=True)
        assert got.dtype == torch.float16 and got.shape == (rows, n)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(
        got.float(), x.float() @ w.float().T + (b.float() if bias else 0.0), rtol=1e-2, atol=1e-2
    )
    assert not sl._TILE_COUNTS[x.device].any()


@pytest.mark.skipif(DEVICE != "cuda", reason="the model takes the kernel on CUDA only")
@pytest.mark.parametrize("rows", [17, 64])
def test_qkv_at_17_to_64_rows_sums_its_split_k_in_one_launch(rows: int) -> None:
    """A narrow linear that feeds no residual add (qkv, with Qwen2's bias) takes split K
    summed in the launch at 17-64 rows: F.linear's result to bf16 rounding, the same bits
    replayed from a CUDA graph as run eagerly."""
    from tandem.engine.models.llama import Linear

    layer = Linear(4096, 6144, bias=True).to(DEVICE, torch.bfloat16)
    x = torch.randn(rows, 4096, device=DEVICE, dtype=torch.bfloat16)
    want = layer(x)
    layer.fused = True
    eager = layer(x)
    torch.testing.assert_close(eager.float(), want.float(), rtol=2e-2, atol=2e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = layer(x)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed, eager)


@pytest.mark.skipif(DEVICE != "cuda", reason="the model takes the kernel on CUDA only")
@pytest.mark.parametrize("rows", [17, 64])
def test_a_fused_mlp_at_17_to_64_rows_feeds_partial_sums_to_the_residual_norm(rows: int) -> None:
    """down returns partial sums there; the next residual norm adds them up: the same
    (normed, residual) as the unfused MLP and norm to bf16 rounding."""
    from transformers import LlamaConfig

    from tandem.engine.models.llama import MLP, RMSNorm

    config = LlamaConfig(hidden_size=1024, intermediate_size=3584)
    mlp = MLP(config).to(DEVICE, torch.bfloat16)
    norm = RMSNorm(1024, 1e-5).to(DEVICE, torch.bfloat16)
    for param in [*mlp.parameters(), *norm.parameters()]:
        torch.nn.init.normal_(param, std=0.02 if param.dim() == 2 else 1.0)
    x = torch.randn(rows, 1024, device=DEVICE, dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    want = norm(mlp(x), residual)
    for module in [*mlp.modules(), norm]:
        module.fused = True
    assert isinstance(mlp(x), sl.PartialSums)
    got = norm(mlp(x), residual)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(sl.triton is None and os.environ.get("CI") != "true", reason="no triton")
@pytest.mark.parametrize("rows", [1, 16, 33, 64])
@pytest.mark.parametrize("config", [None, (32, 128, 4, 2)])
def test_gated_launch_is_silu_of_gate_times_up(rows: int, config) -> None:
    """A [gate; up] weight in one launch: silu(x @ gate.T) * (x @ up.T), each half rounded
    to the model dtype first as the unfused matmul + activation pair does; ragged edges."""
    gen = torch.Generator().manual_seed(rows)
    inter, k = (72, 264) if DEVICE == "cpu" else (14336, 4096)
    x = torch.randn(rows, k, generator=gen).to(DEVICE, torch.float16)
    w = (torch.randn(2 * inter, k, generator=gen) / k**0.5).to(DEVICE, torch.float16)
    got = sl.skinny_linear(x, w, config=config, gated=True)
    halves = (x.float() @ w.float().T).to(torch.float16).float()
    gate, up = halves[:, :inter], halves[:, inter:]
    want = torch.nn.functional.silu(gate) * up
    assert got.dtype == torch.float16 and got.shape == (rows, inter)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-3)


def test_the_gated_launch_is_only_taken_on_a_gpu() -> None:
    """On the CPU (or float32, or more rows than one tile) the MLP does its two steps."""
    x, w = torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(32, 64, dtype=torch.bfloat16)
    assert sl.gated_mlp_input(x, w) is None
    if DEVICE == "cuda":
        assert sl.gated_mlp_input(x.cuda(), w.cuda()) is not None
        assert sl.gated_mlp_input(x.cuda().float(), w.cuda().float()) is None
        big = torch.randn(sl.TILE_ROWS + 1, 64, dtype=torch.bfloat16, device="cuda")
        assert sl.gated_mlp_input(big, w.cuda()) is None


@pytest.mark.skipif(DEVICE != "cuda", reason="the model takes the kernel on CUDA only")
@pytest.mark.parametrize("rows", [1, 8, 64, 65])
def test_a_fused_mlp_matches_the_unfused_one(rows: int) -> None:
    """Through the gated launch (<= 64 rows) or cuBLAS + the SiLU kernel (more): the same
    output as torch's MLP to bf16 rounding."""
    from transformers import LlamaConfig

    from tandem.engine.models.llama import MLP

    mlp = MLP(LlamaConfig(hidden_size=1024, intermediate_size=3584)).to(DEVICE, torch.bfloat16)
    for param in mlp.parameters():
        torch.nn.init.normal_(param, std=0.02)
    x = torch.randn(rows, 1024, device=DEVICE, dtype=torch.bfloat16)
    want = mlp(x)
    for module in mlp.modules():
        module.fused = True
    got = mlp(x)
    got = got.total(torch.bfloat16) if isinstance(got, sl.PartialSums) else got
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-2)
