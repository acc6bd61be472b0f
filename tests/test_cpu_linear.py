"""The C linear for a decode step's few rows (`cpu_kernels.linear`, bfloat16) against the
float32 product rounded once, and the load-time choice of where it is used."""

from __future__ import annotations

import pytest
import torch

from tandem.engine import cpu, cpu_kernels


@pytest.fixture(scope="module")
def lib():
    return cpu_kernels.library()


def rounded_product(x, weight, bias):
    want = x.float() @ weight.float().T
    return want + bias.float() if bias is not None else want


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(960, 576), (8192, 576)])  # the second goes parallel
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_is_the_float32_product_rounded_once(lib, rows, threads, shape, with_bias):
    torch.manual_seed(rows * 7 + threads)
    weight = torch.randn(shape, dtype=torch.bfloat16)
    bias = torch.randn(shape[0], dtype=torch.bfloat16) if with_bias else None
    x = torch.randn(rows, shape[1] + 64, dtype=torch.bfloat16)[:, 32 : 32 + shape[1]]  # strided
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_kernels.linear(lib, x, weight, bias)
    finally:
        torch.set_num_threads(before)
    want = rounded_product(x, weight, bias)
    assert got.shape == (rows, shape[0]) and got.dtype == torch.bfloat16
    # One rounding to bfloat16 (half an ulp, 2^-9 relative) plus float32 sums in another order.
    torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-4)
    assert (got.float() == want.to(torch.bfloat16).float()).float().mean() > 0.99


def test_the_choice_is_timed_only_where_the_kernel_applies(lib):
    weights = [torch.randn(64, 32), torch.randn(64, 32, dtype=torch.bfloat16)]
    packs = [None, None]
    assert cpu.few_rows_limits(weights, packs, None) == [0, 0]  # no C library: never
    limits = cpu.few_rows_limits(weights, packs, lib)
    assert limits[0] == 0  # float32 keeps F.linear
    assert limits[1] in (0, *cpu.FEW_ROWS)
