"""The two-pass Triton argmax against torch's, ties and chunk edges included."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":  # must precede the kernel's definition (tests/conftest.py sets it too)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tandem.engine.kernels import argmax  # noqa: E402

pytestmark = pytest.mark.skipif(
    argmax.triton is None and os.environ.get("CI") != "true", reason="no triton"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_torch_with_ties_across_chunks(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    n = 3 * argmax.CHUNK + 123  # a ragged last chunk
    x = torch.randn(6, n, generator=gen).to(dtype)
    x[1, [5, argmax.CHUNK + 7, n - 1]] = 50.0  # a tie across chunks: the first wins
    x[2, [argmax.CHUNK - 1, argmax.CHUNK]] = 50.0  # on both sides of a chunk edge
    x[3, n - 1] = 50.0  # the last entry of the ragged chunk
    x[4] = float("-inf")  # nothing finite: index 0, as torch says
    x[5] = 1.0  # all equal
    got = argmax.two_pass_argmax(x.to(DEVICE))
    assert got.dtype == torch.int64
    assert got.cpu().tolist() == x.float().argmax(dim=-1).tolist()


def test_argmax_rows_falls_back_to_torch_off_the_gpu() -> None:
    x = torch.randn(3, argmax.CHUNK * 2)
    assert torch.equal(argmax.argmax_rows(x), x.argmax(dim=-1))
    assert argmax.argmax_rows(torch.empty(0, 10)).shape == (0,)
