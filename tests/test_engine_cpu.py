"""The CPU engine's packed linears (oneDNN) and its thread count."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F

from tandem.engine import cpu
from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.protocol import GenerateRequest, SamplingParams

pytestmark = pytest.mark.skipif(not cpu.available(), reason="this torch has no oneDNN")


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_a_packed_bfloat16_linear_gives_f_linears_bits(rows) -> None:
    weight = torch.randn(96, 80).to(torch.bfloat16)
    bias = torch.randn(96).to(torch.bfloat16)
    x = torch.randn(rows, 80).to(torch.bfloat16)
    packed = cpu.pack(weight)
    assert torch.equal(cpu.packed_linear(x, packed, bias), F.linear(x, weight, bias))


def test_only_half_weights_are_packed_and_only_where_faster(monkeypatch) -> None:
    half, single = torch.randn(64, 32).to(torch.bfloat16), torch.randn(64, 32)
    assert cpu.pack_if_faster([single])[0] is None  # float32 stays on F.linear
    monkeypatch.setattr(cpu, "_gain", lambda weight, packed: 1.0)  # no faster: not kept
    assert cpu.pack_if_faster([half]) == [None]
    monkeypatch.setattr(cpu, "_gain", lambda weight, packed: 2.0)
    assert all(p is not None for p in cpu.pack_if_faster([half, half.clone()]))


def greedy(engine: AsyncEngine) -> list[int]:
    async def run() -> list[int]:
        sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        request = GenerateRequest(request_id="r", prompt_token_ids=list(range(5, 40)),
                                  sampling=sampling)  # fmt: skip
        return [t async for out in engine.generate(request) for t in out.token_ids]

    try:
        return asyncio.run(run())
    finally:
        engine.shutdown()


def test_the_packed_engine_generates_what_the_plain_one_does(tiny_llama, monkeypatch) -> None:
    config = EngineConfig(model=str(tiny_llama), dtype="bfloat16", num_gpu_blocks=32,
                          cpu_threads=1)  # fmt: skip
    monkeypatch.setattr(cpu, "_gain", lambda weight, packed: 2.0)  # every weight packed
    packed = AsyncEngine(config)
    model = packed.core.runner.model
    assert model.logits_packed is not None
    assert all(layer.mlp.down_proj.packed is not None for layer in model.layers)
    assert torch.get_num_threads() == 1
    want = greedy(packed)
    monkeypatch.setattr(cpu, "available", lambda: False)
    plain = AsyncEngine(config)
    assert plain.core.runner.model.logits_packed is None
    assert greedy(plain) == want
